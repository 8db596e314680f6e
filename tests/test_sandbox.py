"""The sandbox driver on real Postgres: isolation, standby costs nothing, data survives."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from pgfleet.drivers import cgroups
from pgfleet.drivers.base import DriverError, InstanceSpec, admin_connect
from pgfleet.drivers.sandbox.driver import SandboxDriver
from pgfleet.drivers.sandbox.procscan import find_postmaster

from .conftest import SANDBOX_SKIP

pytestmark = pytest.mark.skipif(SANDBOX_SKIP is not None, reason=f"SKIPPED LOUDLY: {SANDBOX_SKIP}")


@pytest.fixture
async def driver(tmp_path):
    d = SandboxDriver(tmp_path / "sandbox")
    await d.prepare()
    specs: list[InstanceSpec] = []
    d.specs = specs  # type: ignore[attr-defined]
    yield d
    for spec in specs:
        await d.destroy(spec)
    await d.close()


def _spec(driver, tmp_path: Path, name: str, slot: int, memory_mb: int = 128) -> InstanceSpec:
    spec = InstanceSpec(uuid=f"uuid-{name}", name=name, role=name, memory_mb=memory_mb, slot=slot,
                        home=tmp_path / "instances" / name)
    driver.specs.append(spec)
    return spec


async def _query(backend, sql: str, user: str | None = None):
    conn = await admin_connect(backend, user)
    try:
        return await conn.query(sql)
    finally:
        await conn.close()


async def test_postgres_is_isolated(driver, tmp_path):
    spec = _spec(driver, tmp_path, "iso", 11, memory_mb=96)
    backend = await driver.create(spec)
    pm = find_postmaster(driver.data_dir(spec))
    assert pm is not None
    status = Path(f"/proc/{pm}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1] == str(driver.uid_of(spec)), "postgres must run as its own unprivileged uid"
    for ns in ("mnt", "pid", "ipc", "uts", "net"):
        assert os.readlink(f"/proc/{pm}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), f"{ns} namespace shared"
    # inside its PID namespace the postmaster is PID 1 and sees no host processes
    nspid = next(line for line in status.splitlines() if line.startswith("NSpid:")).split()
    assert nspid[-1] == "1"
    # the network namespace has no interface but loopback, and Postgres listens on no TCP port
    rows = (await _query(backend, "SHOW listen_addresses"))[0].rows
    assert rows == [("",)]
    # memory limit from memory_mb
    cg = cgroups.Cgroup(driver.cgroup_parent, spec.uuid)
    limit_file = "memory.max" if cg.v2 else "memory.limit_in_bytes"
    mem_dir = cg.dirs.get("unified") or cg.dirs["memory"]
    assert int((mem_dir / limit_file).read_text()) == 96 * 1024 * 1024
    assert str(pm) in (mem_dir / "cgroup.procs").read_text().split()
    # the data directory belongs to that uid alone
    st = os.stat(driver.data_dir(spec))
    assert st.st_uid == driver.uid_of(spec) and st.st_mode & 0o077 == 0


async def test_tenant_role_is_owner_not_superuser(driver, tmp_path):
    spec = _spec(driver, tmp_path, "owner", 12)
    backend = await driver.create(spec)
    res = await _query(backend, "SELECT current_user, usesuper FROM pg_user WHERE usename = current_user", "owner")
    assert res[0].rows == [("owner", "f")]
    res = await _query(backend, "CREATE TABLE t(x int); SELECT tableowner FROM pg_tables WHERE tablename='t'", "owner")
    assert res[-1].rows == [("owner",)]


async def test_standby_leaves_no_process_and_no_cgroup(driver, tmp_path):
    spec = _spec(driver, tmp_path, "zero", 13)
    await driver.create(spec)
    await driver.suspend(spec)
    assert find_postmaster(driver.data_dir(spec)) is None
    cg = cgroups.Cgroup(driver.cgroup_parent, spec.uuid)
    assert not any(d.exists() for d in cg.dirs.values())
    assert await driver.usage(spec) == {"rss_bytes": 0}


async def test_data_survives_many_suspend_resume_cycles(driver, tmp_path):
    spec = _spec(driver, tmp_path, "cycles", 14)
    backend = await driver.create(spec)
    await _query(backend, "CREATE TABLE log(i int primary key)", "cycles")
    for i in range(25):
        await _query(backend, f"INSERT INTO log VALUES ({i})", "cycles")
        await driver.suspend(spec)
        backend = await driver.start(spec)
        rows = (await _query(backend, "SELECT count(*), coalesce(max(i), -1) FROM log"))[0].rows
        assert rows == [(str(i + 1), str(i))]


async def test_data_survives_kill_9_of_postgres(driver, tmp_path):
    spec = _spec(driver, tmp_path, "crash", 15)
    exits = []
    driver.on_exit = lambda s, reason: exits.append((s.name, reason))
    backend = await driver.create(spec)
    await _query(backend, "CREATE TABLE t(x int); INSERT INTO t SELECT generate_series(1, 1000)", "crash")
    pm = find_postmaster(driver.data_dir(spec))
    os.kill(pm, 9)
    await driver._running[spec.uuid].waiter  # the driver notices the exit itself
    assert exits == [("crash", "exited")]
    backend = await driver.start(spec)  # crash recovery from WAL
    assert (await _query(backend, "SELECT count(*) FROM t"))[0].rows == [("1000",)]


async def test_recover_adopts_a_live_postmaster_and_never_doubles_it(driver, tmp_path):
    spec = _spec(driver, tmp_path, "adopt", 16)
    await driver.create(spec)
    pm = find_postmaster(driver.data_dir(spec))
    # a new driver object stands for a restarted daemon that knows nothing in memory
    fresh = SandboxDriver(driver.state_dir)
    await fresh.prepare()
    backend = await fresh.recover(spec)
    assert backend is not None
    assert find_postmaster(fresh.data_dir(spec)) == pm
    # start() on an adopted instance must not launch a second postmaster
    await fresh.start(spec)
    assert find_postmaster(fresh.data_dir(spec)) == pm
    await fresh.suspend(spec)
    assert find_postmaster(fresh.data_dir(spec)) is None
    driver._running.clear()  # the first driver's watcher belongs to the "dead" daemon
    await fresh.close()


async def test_a_database_made_before_the_rename_keeps_working_and_is_renamed_at_its_next_start(driver, tmp_path):
    """Instances made before the database inside took the database's name hold "postgres"
    (and no record of the name): adopted after an upgrade they are reached as they are, and
    their next start renames the database inside."""
    spec = _spec(driver, tmp_path, "legacy", 17)
    backend = await driver.create(spec)
    assert backend.database == "legacy"
    await _query(backend, "CREATE TABLE t(x int); INSERT INTO t VALUES (1)", "legacy")
    # what an older pgfleet left: "postgres" inside, no record of the name, an older marker
    await _query(replace(backend, database="template1"), "ALTER DATABASE legacy RENAME TO postgres")
    (spec.home / "database").unlink()
    (spec.home / "personalised").write_text("an older version's")
    driver._running.pop(spec.uuid).waiter.cancel()  # the old daemon is gone: it unmounts nothing
    upgraded = SandboxDriver(driver.state_dir)  # a restarted daemon of this version
    await upgraded.prepare()
    adopted = await upgraded.recover(spec)
    assert adopted is not None and adopted.database == "postgres"
    assert (await _query(adopted, "SELECT current_database(), count(*) FROM t", "legacy"))[0].rows \
        == [("postgres", "1")]
    await upgraded.suspend(spec)
    backend = await upgraded.start(spec)
    assert backend.database == "legacy"
    assert (await _query(backend, "SELECT current_database(), count(*) FROM t", "legacy"))[0].rows \
        == [("legacy", "1")]
    await upgraded.suspend(spec)
    await upgraded.close()


def _live_processes_of_uid(uid: int) -> dict[int, str]:
    """pid -> name of the live processes running as `uid` (a zombie is dead: only its exit
    status waits to be collected)."""
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                status = dict(line.split(":\t", 1) for line in open(f"{entry.path}/status").read().splitlines()
                              if ":\t" in line)
            except OSError:
                continue
            if status.get("Uid", "").split()[:1] == [str(uid)] and not status.get("State", "").startswith("Z"):
                found[int(entry.name)] = status.get("Name", "?")
    return found


async def test_a_start_given_up_leaves_no_process(driver, tmp_path):
    """A start that fails (here: its ready deadline passes at different moments of the start)
    leaves no postgres behind, whether it got as far as the jail, the postmaster or its
    children. (The jail's uid change clears unshare's kill-child signal: before the fix a
    postmaster outlived its killed unshare, found after a wake storm.)"""
    spec = _spec(driver, tmp_path, "giveup", 17)
    await driver.provision(spec)
    uid = driver.uid_of(spec)
    for timeout in (0.0, 0.002, 0.01, 0.02, 0.04):
        try:
            await driver._launch(spec, ready_timeout_s=timeout)
        except DriverError:
            pass
        else:  # it was ready in time: stop it, the next timeout tries another moment
            await driver.stop(spec)
        left = _live_processes_of_uid(uid)
        assert not left, f"{left}: processes of the instance left after a start given up at {timeout}s"
        assert find_postmaster(driver.data_dir(spec)) is None
    backend = await driver.start(spec)  # and the instance still starts normally
    assert (await _query(backend, "SELECT 1"))[0].rows == [("1",)]


def _parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


async def test_postgres_starts_forked_from_the_zygote_and_without_it(driver, tmp_path):
    """A start forks the zygote (postgres loaded once) instead of exec'ing postgres: same jail,
    same name and process titles (procscan and the tests find postmasters by them); a zygote
    that died is replaced at the next start, and with none at all a start execs the jail."""
    assert driver.zygote is not None, "a C compiler is there: the zygote library builds"
    spec = _spec(driver, tmp_path, "zyg", 18)
    backend = await driver.create(spec)
    pm = find_postmaster(driver.data_dir(spec))
    assert pm is not None
    handle = _parent_of(pm)
    zygote = driver.zygote._proc.pid
    assert _parent_of(handle) == zygote and _parent_of(zygote) == os.getpid()
    assert Path(f"/proc/{pm}/comm").read_text().strip() == "postgres"
    assert Path(f"/proc/{pm}/cmdline").read_bytes().startswith(str(driver.pg.postgres).encode() + b"\0-D\0")
    status = Path(f"/proc/{pm}/status").read_text()
    assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status and "CapBnd:\t0000000000000000" in status
    assert "LD_PRELOAD" not in Path(f"/proc/{pm}/environ").read_text()
    titles = [Path(f"/proc/{p}/cmdline").read_bytes() for p in
              Path(f"/proc/{pm}/task/{pm}/children").read_text().split()]
    assert any(t.startswith(b"postgres: zyg: checkpointer") for t in titles), titles
    assert (await _query(backend, "SELECT 1"))[0].rows == [("1",)]
    await driver.suspend(spec)
    assert find_postmaster(driver.data_dir(spec)) is None, "the handle and its postmaster are gone"

    driver.zygote._proc.kill()
    driver.zygote._proc.wait()
    backend = await driver.start(spec)  # a new zygote
    assert _parent_of(_parent_of(find_postmaster(driver.data_dir(spec)))) == driver.zygote._proc.pid != zygote
    await driver.suspend(spec)

    kept, driver.zygote = driver.zygote, None
    try:
        backend = await driver.start(spec)  # exec'd: the handle is the daemon's own child
        assert _parent_of(_parent_of(find_postmaster(driver.data_dir(spec)))) == os.getpid()
        assert (await _query(backend, "SELECT 1"))[0].rows == [("1",)]
        await driver.suspend(spec)
    finally:
        driver.zygote = kept


async def test_a_start_works_when_the_daemon_holds_fds_past_1024(driver, tmp_path):
    """A daemon with a thousand databases holds more than 1,024 fds (sessions, spares,
    backends): every wait in a start polls instead of select()ing (select() refuses such
    fds; a storm of 1,000 found every start failing with ValueError)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    filler = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        spec = _spec(driver, tmp_path, "manyfds", 18)
        await driver.provision(spec)
        backend = await driver.start(spec)
        assert (await _query(backend, "SELECT 1"))[0].rows == [("1",)]
        await driver.stop(spec)
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
