"""Issue 10 item 3: the home's state, logs and keys are unreadable by instance uids."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time

import pytest

from ..conftest import SANDBOX_SKIP

pytestmark = pytest.mark.skipif(SANDBOX_SKIP is not None, reason=f"SKIPPED LOUDLY: {SANDBOX_SKIP}")


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_home_secrets_and_logs_are_root_only(daemon):
    daemon.cli("db", "create", "shop")
    home = daemon.home
    for name in ("state.db", "token", "daemon.log"):
        assert _mode(home / name) & 0o077 == 0, f"{name} is {oct(_mode(home / name))}"
    for wal in home.glob("state.db-*"):
        assert _mode(wal) & 0o077 == 0, f"{wal.name} is {oct(_mode(wal))}"
    assert _mode(home / "tls") & 0o077 == 0
    (instance,) = (home / "instances").iterdir()
    assert _mode(instance / "postgres.log") & 0o077 == 0
    for f in (instance / "auth").iterdir():  # hba/ident: readable, never writable, by the tenant
        assert _mode(f) & 0o022 == 0 and f.stat().st_uid == 0


def test_uids_are_unique_per_host_and_never_one_that_runs_processes(tmp_path):
    """The registry is host-wide (here: its own directory, so the test leaves the host's alone):
    a uid held by a live instance, or running any process, is never given out again."""
    from pgfleet.drivers.sandbox.uids import UidRegistry

    reg = UidRegistry(tmp_path / "registry")
    homes = [tmp_path / f"home{i}" for i in range(4)]
    for h in homes:
        h.mkdir()
    u0, u1 = reg.allocate(homes[0]), reg.allocate(homes[1])
    assert u0 != u1
    assert reg.allocate(homes[0]) == u0, "an interrupted create gets its own uid back"
    busy = u1 + 1
    sleeper = subprocess.Popen(["setpriv", f"--reuid={busy}", f"--regid={busy}", "--clear-groups", "sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while os.stat(f"/proc/{sleeper.pid}").st_uid != busy:  # setpriv has switched
            assert time.monotonic() < deadline
            time.sleep(0.01)
        u2 = reg.allocate(homes[2])
        assert u2 not in (u0, u1, busy)
    finally:
        sleeper.kill()
        sleeper.wait()
    shutil.rmtree(homes[0])  # a home removed behind pgfleet's back: its entry is stale
    u3 = reg.allocate(homes[3])
    assert u3 != u1 and u3 != u2
    assert (tmp_path / "registry" / str(u3)).read_text() == str(homes[3])
    reg.release(u1, homes[1])
    assert not (tmp_path / "registry" / str(u1)).exists()


async def test_two_homes_on_one_host_never_share_a_uid(tmp_path):
    from pgfleet.drivers.base import InstanceSpec
    from pgfleet.drivers.sandbox.driver import SandboxDriver

    drivers = [SandboxDriver(tmp_path / f"home{i}") for i in range(2)]
    specs = [InstanceSpec(uuid=f"u{i}", name=f"db{i}", role=f"db{i}", memory_mb=64, slot=1,
                          home=tmp_path / f"home{i}" / "instances" / f"u{i}") for i in range(2)]
    for d in drivers:
        await d.prepare()
    try:
        for d, s in zip(drivers, specs):
            await d._clone(s)  # same slot in both homes: the old scheme gave both one uid
        uids = [d.uid_of(s) for d, s in zip(drivers, specs)]
        assert uids[0] != uids[1]
        assert [os.stat(d.data_dir(s)).st_uid for d, s in zip(drivers, specs)] == uids
    finally:
        for d, s in zip(drivers, specs):
            await d.destroy(s)
            await d.close()
