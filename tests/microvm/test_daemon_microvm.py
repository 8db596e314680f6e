"""The whole product on the microvm driver: `pgfleet up --driver microvm`, the proxy waking
VMs from snapshots, and the `idle` policy keeping sessions open across a suspend."""

from __future__ import annotations

import os
import time

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
    assert d.json("db", "show", "vm1")["backend"].startswith("netns:pgf-")
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
