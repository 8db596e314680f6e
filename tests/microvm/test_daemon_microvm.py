"""The whole product on the microvm driver: `pgfleet up --driver microvm`, the proxy waking
VMs from snapshots, and the `idle` policy keeping sessions open across a suspend."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psycopg
import pytest

from tests.conftest import start_daemon, stop_daemon
from tests.polling import wait_until


@pytest.fixture
def vm_daemon(image, tmp_path):
    from tests.conftest import SANDBOX_SKIP

    if SANDBOX_SKIP:
        pytest.skip(f"SKIPPED LOUDLY: {SANDBOX_SKIP}")
    home = tmp_path / "home"
    env = dict(os.environ, PGFLEET_HOME=str(home), PGPASSFILE=str(tmp_path / "pgpass"))
    d = start_daemon(home, env, driver="microvm")
    try:
        yield d
    finally:
        stop_daemon(d)


def _wait_state(d, name: str, state: str, timeout: float = 120) -> dict:
    return wait_until(lambda: (shown := d.json("db", "show", name))["state"] == state and shown,
                      timeout, f"{name} to be {state}", interval=0.1)


def test_create_query_suspend_and_wake_through_the_proxy(vm_daemon):
    d = vm_daemon
    created = d.json("db", "create", "vm1", "--cooldown-ms", "600000")
    assert created["driver"] == "microvm" and created["state"] == "running"
    shown = d.json("db", "show", "vm1")
    assert shown["backend"].startswith("netns:pgf-")
    # what it owns: its copy-on-write disk's own clusters, not its template's image (~31 MiB)
    assert 0 < shown["disk_bytes"] < 4 * 2**20, shown["disk_bytes"]
    assert d.json("db", "logs", "vm1")["size"] > 0, "the VM's console is captured"
    for uri in (created["uri"], created["pooled_uri"]):
        with psycopg.connect(uri, autocommit=True, connect_timeout=120) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("vm1",)
            conn.execute("CREATE TABLE IF NOT EXISTS t(x int)")
            conn.execute("INSERT INTO t VALUES (1)")
    for _ in range(3):
        assert d.json("db", "suspend", "vm1")["state"] == "standby"
        with psycopg.connect(created["uri"], autocommit=True, connect_timeout=120) as conn:
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)


def test_idle_policy_suspends_under_an_open_session_and_its_next_query_wakes_it(vm_daemon):
    d = vm_daemon
    # a cooldown the CLI round trip after the wake fits in (a 500 ms one could suspend the VM
    # again before `db show` answered), shorter than the open transaction below
    created = d.json("db", "create", "vm2", "--policy", "idle", "--cooldown-ms", "3000")
    with psycopg.connect(created["uri"], autocommit=True, connect_timeout=120) as conn:
        conn.execute("CREATE TABLE t AS SELECT 42 AS x")
        shown = _wait_state(d, "vm2", "standby")
        assert shown["state"] == "standby", "an idle open session must not keep the VM awake"
        assert shown["clients"] == 1
        # the same session, across the suspend: its next packet wakes the VM
        assert conn.execute("SELECT x FROM t").fetchone() == (42,)
        assert d.json("db", "show", "vm2")["state"] == "running"
        # while a transaction is open it is never suspended
        conn.execute("BEGIN")
        conn.execute("SELECT 1")
        deadline = time.monotonic() + 4.5  # longer than the cooldown
        while time.monotonic() < deadline:
            assert d.json("db", "show", "vm2")["state"] == "running"
            time.sleep(0.2)
        conn.execute("COMMIT")


def _qemus_under(home) -> list[int]:
    """QEMU processes serving instances of the pgfleet home `home` (by their RAM file path)."""
    needle = f"mem-path={os.path.realpath(home)}/".encode()
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and needle in Path(f"/proc/{entry}/cmdline").read_bytes():
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def test_warm_standby_holds_sessions_on_both_listeners_and_survives_kill_9_and_down(vm_daemon):
    """The warm tier on the microvm driver: a paused VM, its held sessions going on through
    the direct and the pooled listener; kill -9 of the daemon: the next one re-attaches to
    the paused VM (a thaw, not a restore); `pgfleet down` leaves no paused VM behind."""
    d = vm_daemon
    try:
        created = d.json("db", "create", "vmw", "--policy", "idle", "--cooldown-ms", "600000")
        direct = psycopg.connect(created["uri"], autocommit=True, connect_timeout=120)
        pooled = psycopg.connect(created["pooled_uri"], autocommit=True, connect_timeout=120)
        try:
            direct.execute("CREATE TABLE t AS SELECT 1 AS x")
            direct.execute("SET application_name = 'kept'")
            pid = direct.execute("SELECT pg_backend_pid()").fetchone()[0]
            [qemu] = _qemus_under(d.home)
            for conn in (direct, pooled):
                shown = d.json("db", "suspend", "vmw", "--tier", "warm")
                assert (shown["state"], shown["standby_tier"]) == ("standby", "warm")
                assert shown["memory_charged_bytes"] > 0
                assert conn.execute("SELECT sum(x) FROM t").fetchone() == (1,)
                assert d.json("db", "show", "vmw")["state"] == "running"
            assert direct.execute("SELECT pg_backend_pid(), current_setting('application_name')"
                                  ).fetchone() == (pid, "kept")
            assert _qemus_under(d.home) == [qemu]  # thawed, never restored
        finally:
            direct.close()
            pooled.close()
        d.json("db", "suspend", "vmw", "--tier", "warm")
        starts = d.json("db", "show", "vmw")["start_count"]
        os.kill(d.info["pid"], signal.SIGKILL)
        wait_until(lambda: not Path(f"/proc/{d.info['pid']}").exists(), 30, "the daemon to die")
        d = start_daemon(d.home, d.env, like=d, driver="microvm")
        assert d.json("db", "show", "vmw")["standby_tier"] == "warm"
        assert _qemus_under(d.home) == [qemu]
        with psycopg.connect(created["uri"], autocommit=True, connect_timeout=120) as conn:
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
        assert d.json("db", "show", "vmw")["start_count"] == starts + 1
        assert _qemus_under(d.home) == [qemu]  # a thaw of the adopted VM
        d.json("db", "suspend", "vmw", "--tier", "warm")
        d.cli("down")
        assert _qemus_under(d.home) == []
        d = start_daemon(d.home, d.env, like=d, driver="microvm")
        assert d.json("db", "show", "vmw")["standby_tier"] == "cold"
        with psycopg.connect(created["uri"], autocommit=True, connect_timeout=120) as conn:
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
    finally:
        stop_daemon(d)
        for pid in _qemus_under(d.home):  # a failure must not leave a paused VM behind
            os.kill(pid, signal.SIGKILL)
