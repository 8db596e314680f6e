"""The microvm driver end to end: real QEMU, a real guest kernel, real Postgres in the guest."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pgfleet.drivers.base import DriverError, netns_socket
from pgfleet.drivers.microvm import MicroVMDriver
from pgfleet.drivers.microvm.vmm import VmFiles
from pgfleet.pgwire.client import QueryError

from .conftest import connect, new_spec, query
from ..polling import until

# One event loop for the whole session: the shared driver watches its VMs through it.
pytestmark = [pytest.mark.microvm, pytest.mark.asyncio(loop_scope="session")]


def qemu_pids(home: Path) -> list[int]:
    """QEMU processes serving the instance in `home` (found by its RAM file path)."""
    needle = f"mem-path={home}/ram".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if needle in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


# ------------------------------------------------------------------ create / query

async def test_create_gives_a_personalised_running_database(driver, make_instance):
    spec, backend = await make_instance(role="alice")
    assert backend.netns == f"pgf-{spec.slot}" and backend.host == "10.0.0.2"
    conn = await connect(backend, "alice")
    try:
        [r] = await conn.query(
            "SELECT current_user, rolsuper::text, pg_get_userbyid(d.datdba), "
            "(SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'public'), "
            "extract(epoch FROM now())::bigint, current_database() "
            "FROM pg_roles r, pg_database d WHERE r.rolname = current_user AND d.datname = current_database()")
        user, superuser, db_owner, schema_owner, guest_epoch, database = r.rows[0]
        # schema public is pg_database_owner's (initdb's default): the database owner's, alice's
        assert (user, superuser, db_owner, schema_owner) == ("alice", "false", "alice", "pg_database_owner")
        # the database inside carries the database's name
        assert database == spec.name and backend.database == spec.name
        # The template was snapshotted earlier: the guest clock must have been set on restore.
        assert abs(int(guest_epoch) - time.time()) < 5
        await conn.query("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        await conn.query("INSERT INTO notes VALUES (1, 'hello')")
        assert await conn.scalar("SELECT body FROM notes WHERE id = 1") == "hello"
    finally:
        await conn.close()
    assert "database system is ready" in driver.log_path(spec).read_text()
    # QEMU gave up root after opening its files, and the tenant's files are private.
    [pid] = qemu_pids(spec.home)
    uids = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines()
                if l.startswith("Uid:")).split()[1:]
    assert set(uids) == {"65534"}, f"qemu runs with uids {uids}"
    for f in (VmFiles(spec.home).ram, VmFiles(spec.home).disk):
        assert os.stat(f).st_mode & 0o077 == 0, f"{f} is readable by others"


async def test_reserved_role_names_are_refused(driver, tmp_path):
    for role in ("postgres", "pg_monitor"):
        with pytest.raises(DriverError, match="reserved"):
            await driver.create(new_spec(tmp_path, role=role))


async def test_failed_create_leaves_nothing(driver, tmp_path):
    # passes the driver's own name check (it refuses "" and pg_* up front), is restored fine,
    # then Postgres refuses the role name: the teardown after a restore is what is tested
    spec = new_spec(tmp_path, role="public")
    with pytest.raises(DriverError, match='role name "public" is reserved'):
        await driver.create(spec)
    assert qemu_pids(spec.home) == []
    assert not Path(f"/run/netns/pgf-{spec.slot}").exists()
    assert not spec.home.exists() or not any(spec.home.iterdir())


# ------------------------------------------------------------------ scale to zero

async def test_suspend_leaves_no_process_and_wake_keeps_sessions_and_data(driver, make_instance):
    spec, backend = await make_instance()
    files = VmFiles(spec.home)
    await query(backend, "CREATE TABLE cycles (n int)", "tenant")
    held = await connect(backend, "tenant")  # one session kept open across every cycle
    try:
        for n in range(1, 23):
            await query(backend, f"INSERT INTO cycles VALUES ({n})", "tenant")
            await driver.suspend(spec)
            assert qemu_pids(spec.home) == [], "suspend must leave no QEMU process"
            assert files.state.exists() and "rss_bytes" not in await driver.usage(spec)
            await driver.start(spec)
            assert not files.state.exists(), "a resumed VM's snapshot must be void"
            assert driver.last_timings.get("mode") == 0.0, "start after suspend must restore, not boot"
            assert await held.scalar("SELECT count(*) FROM cycles") == str(n)
            assert await query(backend, "SELECT sum(n) FROM cycles") == str(n * (n + 1) // 2)
    finally:
        await held.close()
    assert driver.test_exits == [] or all(u != spec.uuid for u, _ in driver.test_exits)


async def test_suspend_and_start_are_idempotent(driver, make_instance):
    spec, backend = await make_instance()
    await driver.suspend(spec)
    await driver.suspend(spec)
    await driver.start(spec)
    await driver.start(spec)
    assert len(qemu_pids(spec.home)) == 1
    assert await query(backend, "SELECT 1") == "1"


async def test_running_vm_reports_usage(driver, make_instance):
    spec, backend = await make_instance()
    await query(backend, "SELECT 1")
    use = await driver.usage(spec)
    assert use["pss_bytes"] > 0 and use["rss_bytes"] >= use["pss_bytes"]
    assert use["disk_bytes"] < 256 * 2**20
    # The PSS breakdown adds up, and each part is really there: the guest ran, so its RAM
    # file is mapped; under TCG the translation cache holds code; QEMU has its own heap.
    parts = [use["pss_guest_ram_bytes"], use["pss_tcg_bytes"], use["pss_qemu_bytes"]]
    assert sum(parts) == use["pss_bytes"]
    assert use["pss_guest_ram_bytes"] > 4 * 2**20 and use["pss_qemu_bytes"] > 2**20
    assert (use["pss_tcg_bytes"] > 2**20) == (driver.accel == "tcg")


# ------------------------------------------------------------------ clones

async def test_clones_are_independent(driver, make_instance):
    (a, ba), (b, bb) = await make_instance("ta"), await make_instance("tb")
    await query(ba, "CREATE TABLE only_in_a (x int); INSERT INTO only_in_a VALUES (42)", "ta")
    assert await query(ba, "SELECT x FROM only_in_a", "ta") == "42"
    with pytest.raises(QueryError, match="does not exist"):
        await query(bb, "SELECT x FROM only_in_a", "tb")
    assert await query(bb, "SELECT count(*) FROM pg_roles WHERE rolname = 'ta'") == "0"
    # Both were restored from one snapshot: without the reseed they would draw the same numbers.
    ra = await query(ba, "SELECT gen_random_uuid()::text")
    rb = await query(bb, "SELECT gen_random_uuid()::text")
    assert ra != rb
    # Cancel keys come from the postmaster's own RNG, also cloned: they must differ too.
    ca, cb = await connect(ba), await connect(bb)
    try:
        assert ca.secret_key != cb.secret_key
    finally:
        await ca.close()
        await cb.close()


async def test_tenants_cannot_reach_each_other(driver, make_instance):
    (a, ba), (b, bb) = await make_instance("ta"), await make_instance("tb")
    await query(ba, "CREATE TABLE whoami AS SELECT 'a'::text AS me", "ta")
    await query(bb, "CREATE TABLE whoami AS SELECT 'b'::text AS me", "tb")
    # Same guest address, different namespaces: from a's namespace you only ever reach a.
    assert os.stat(f"/run/netns/{ba.netns}").st_ino != os.stat(f"/run/netns/{bb.netns}").st_ino
    for _ in range(3):
        assert await query(ba, "SELECT me FROM whoami", "ta") == "a"
        assert await query(bb, "SELECT me FROM whoami", "tb") == "b"
    # a's namespace routes nowhere but its own /30: any other address is unreachable at once
    # (no packet leaves; nothing is sent into the host namespace).
    routes = subprocess.run(["ip", "-n", ba.netns, "-j", "route"], capture_output=True,
                            text=True, check=True).stdout
    assert [r["dst"] for r in json.loads(routes)] == ["10.0.0.0/30"]
    sock = await asyncio.get_running_loop().run_in_executor(None, netns_socket, ba.netns)
    with sock, pytest.raises(OSError) as err:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("192.0.2.1", 5432)), 5)
    assert err.value.errno == 101  # ENETUNREACH
    # And from inside guest a, Postgres cannot open a connection anywhere beyond its /30.
    await query(ba, "CREATE EXTENSION IF NOT EXISTS dblink")
    with pytest.raises(QueryError, match="could not|timeout|unreachable"):
        await query(ba, "SELECT dblink_connect('host=192.0.2.1 port=5432 connect_timeout=2')")


# ------------------------------------------------------------------ faults

async def test_vmm_kill_is_reported_and_start_recovers_committed_rows(driver, make_instance):
    spec, backend = await make_instance()
    await query(backend, "CREATE TABLE ledger (n int)", "tenant")
    for n in range(50):
        await query(backend, f"INSERT INTO ledger VALUES ({n})", "tenant")
    [pid] = qemu_pids(spec.home)
    os.kill(pid, signal.SIGKILL)
    await until(lambda: any(u == spec.uuid for u, _ in driver.test_exits), 10, "on_exit")
    reason = next(r for u, r in driver.test_exits if u == spec.uuid)
    assert "SIGKILL" in reason
    await driver.start(spec)
    assert driver.last_timings.get("mode") == 1.0, "after a kill the VM must cold boot"
    assert await query(backend, "SELECT count(*) FROM ledger") == "50"
    assert await query(backend, "SELECT current_setting('is_superuser')", "tenant") == "off"


async def test_stop_then_start_cold_boots_with_data(driver, make_instance):
    spec, backend = await make_instance()
    await query(backend, "CREATE TABLE kept AS SELECT 7 AS x", "tenant")
    await driver.stop(spec)
    assert qemu_pids(spec.home) == []
    assert not VmFiles(spec.home).ram.exists()
    assert "database system is shut down" in driver.log_path(spec).read_text()
    await driver.start(spec)
    assert await query(backend, "SELECT x FROM kept") == "7"


async def test_recover_adopts_a_running_vm_after_daemon_restart(driver, make_instance, tmp_path):
    spec, backend = await make_instance()
    await query(backend, "CREATE TABLE survived AS SELECT 1 AS x", "tenant")
    # The daemon "dies": its QMP session goes away (QEMU accepts one at a time) and it
    # forgets the VM. A second driver object stands in for the restarted daemon.
    _, vm = driver._vms.pop(spec.uuid)
    vm.expected_exit = True
    await vm.close_qmp()
    restarted = MicroVMDriver(tmp_path / "state2")
    await restarted.prepare()  # image and template are cached: quick
    assert await restarted.recover(spec) is not None
    assert await query(backend, "SELECT x FROM survived") == "1"
    await restarted.suspend(spec)
    assert qemu_pids(spec.home) == []
    assert await restarted.recover(spec) is None
    await restarted.start(spec)
    assert await query(backend, "SELECT x FROM survived") == "1"
    await restarted.destroy(spec)
    assert qemu_pids(spec.home) == []
    assert not Path(f"/run/netns/pgf-{spec.slot}").exists()


async def test_a_vm_made_before_the_rename_is_reached_at_its_postgres_database(driver, make_instance, tmp_path):
    """A VM made before the database inside took the database's name holds "postgres" and
    no record of the name: after an upgrade it is reached there, adopted, woken and restarted."""
    spec, backend = await make_instance()
    await query(replace(backend, database="template1"), f"ALTER DATABASE {spec.name} RENAME TO postgres")
    (spec.home / "database").unlink()
    _, vm = driver._vms.pop(spec.uuid)
    vm.expected_exit = True
    await vm.close_qmp()
    upgraded = MicroVMDriver(tmp_path / "state2")
    await upgraded.prepare()
    adopted = await upgraded.recover(spec)
    assert adopted is not None and adopted.database == "postgres"
    assert await query(adopted, "SELECT current_database()", "tenant") == "postgres"
    await upgraded.suspend(spec)
    woken = await upgraded.start(spec)
    assert await query(woken, "SELECT current_database()", "tenant") == "postgres"
    await upgraded.destroy(spec)


async def test_recover_cleans_up_when_the_vm_is_gone(driver, make_instance):
    spec, backend = await make_instance()
    [pid] = qemu_pids(spec.home)
    os.kill(pid, signal.SIGKILL)
    await until(lambda: any(u == spec.uuid for u, _ in driver.test_exits), 10, "on_exit")
    assert await driver.recover(spec) is None
    await driver.start(spec)
    assert await query(backend, "SELECT 1") == "1"


async def test_snapshot_from_before_a_host_crash_is_not_trusted(driver, make_instance):
    """An unsynced snapshot written in another host boot must not be restored."""
    spec, backend = await make_instance()
    await query(backend, "CREATE TABLE durable AS SELECT 5 AS x", "tenant")
    await driver.suspend(spec)
    await driver._cancel_sync(spec)  # let the background fsync finish
    files = VmFiles(spec.home)
    marker = files.state.with_name("vmstate.durable")
    assert marker.read_text().startswith("synced ")
    # Pretend the snapshot was written in an earlier boot and never synced.
    marker.write_text("00000000-0000-0000-0000-000000000000 deadbeef\n")
    await driver.start(spec)
    assert driver.last_timings.get("mode") == 1.0, "an untrusted snapshot must mean a cold boot"
    assert await query(backend, "SELECT x FROM durable") == "5"


async def test_other_memory_sizes_get_their_own_template(driver, tmp_path):
    spec = new_spec(tmp_path, role="big", memory_mb=192)
    try:
        backend = await driver.create(spec)
        total_kb = await query(backend, "SELECT pg_read_file('/proc/meminfo')")
        mem_total_kb = int(total_kb.split()[1])
        assert 150_000 < mem_total_kb <= 192 * 1024
        await driver.suspend(spec)
        await driver.start(spec)
        assert await query(backend, "SELECT current_user", "big") == "big"
    finally:
        await driver.destroy(spec)


async def test_concurrent_creates_and_wakes(driver, make_instance):
    made = await asyncio.gather(*(make_instance(f"c{i}") for i in range(3)))
    for i, (spec, backend) in enumerate(made):
        await query(backend, f"CREATE TABLE mine AS SELECT {i} AS i", f"c{i}")
    await asyncio.gather(*(driver.suspend(spec) for spec, _ in made))
    await asyncio.gather(*(driver.start(spec) for spec, _ in made))
    for i, (spec, backend) in enumerate(made):
        assert await query(backend, "SELECT i FROM mine", f"c{i}") == str(i)


async def test_freed_guest_memory_returns_to_the_host(driver, make_instance):
    """Free page reporting: memory a query used and freed leaves the VM's RAM file."""
    spec, backend = await make_instance()
    ram = VmFiles(spec.home).ram

    def allocated() -> int:
        return os.stat(ram).st_blocks * 512

    await query(backend, "SET work_mem = '48MB'; SELECT count(*) FROM "
                         "(SELECT md5(g::text) FROM generate_series(1, 120000) g ORDER BY 1) s")
    peak = allocated()
    await until(lambda: allocated() < peak - 8 * 2**20, 20, "freed memory to be reported")


async def test_clones_come_from_the_pre_copied_pool(driver, make_instance):
    tpl = driver._templates[(128, 1)]
    pool = driver.pool.dir(tpl)
    driver.pool.refill(tpl)

    def ready() -> int:
        return sum(1 for p in pool.iterdir() if p.name.startswith("ready-")) if pool.exists() else 0

    await until(lambda: ready() >= driver.pool.size, 30, "the clone pool to fill")
    spec, backend = await make_instance()
    assert "pool_take_ms" in driver.last_timings and "copy_ms" not in driver.last_timings
    assert await query(backend, "SELECT current_user", "tenant") == "tenant"
    assert not (spec.home / ".pool-claim").exists()


async def test_start_adopts_a_vm_left_running_instead_of_starting_a_second(driver, make_instance, tmp_path):
    spec, backend = await make_instance()
    _, vm = driver._vms.pop(spec.uuid)  # the daemon that started it is gone...
    vm.expected_exit = True
    await vm.close_qmp()
    restarted = MicroVMDriver(tmp_path / "state3")
    await restarted.prepare()
    await restarted.start(spec)  # ...and the new one calls start() without recover()
    assert qemu_pids(spec.home) == [vm.pid]
    assert await query(backend, "SELECT 1") == "1"
    await restarted.destroy(spec)


# ------------------------------------------------------------------ copy-on-write data disks

async def test_a_fresh_database_owns_only_a_small_overlay_of_its_templates_disk(driver, make_instance):
    from pgfleet.drivers.microvm.qcow2 import backing_file
    from pgfleet.drivers.microvm.snapshot import allocated_bytes
    from pgfleet.drivers.microvm.vmm import recorded_backing

    tpl = driver._templates[(128, 1)]
    spec, backend = await make_instance()
    files = VmFiles(spec.home)
    assert files.disk == files.data_cow and not files.data.exists()
    assert recorded_backing(files) == backing_file(files.disk) == tpl.files.data
    assert (tpl.dir / "users" / spec.uuid).exists(), "the template image must be kept for it"
    fresh = await driver.disk_bytes(spec)
    assert fresh < 4 * 2**20 < allocated_bytes(tpl.files.data) // 4, \
        f"fresh disk {fresh} bytes vs template {allocated_bytes(tpl.files.data)}"

    await query(backend, "CREATE TABLE big AS SELECT g, md5(g::text) AS h "
                         "FROM generate_series(1, 20000) g", "tenant")
    await query(backend, "CHECKPOINT")  # the table's pages reach the disk, not just the WAL
    await driver.suspend(spec)
    await driver.start(spec)
    assert driver.last_timings.get("mode") == 0.0, "start after suspend must restore"
    assert await query(backend, "SELECT count(*) FROM big", "tenant") == "20000"
    assert await driver.disk_bytes(spec) > fresh, "written clusters belong to the database"

    await driver.destroy(spec)
    assert not (tpl.dir / "users" / spec.uuid).exists()
    assert tpl.files.data.exists(), "destroying a database leaves the shared template image"


async def test_a_disk_whose_template_image_is_missing_is_refused(driver, make_instance, tmp_path):
    from pgfleet.drivers.microvm.vmm import record_backing

    spec, _ = await make_instance()
    await driver.stop(spec)
    files = VmFiles(spec.home)
    record_backing(files, tmp_path / "pruned-template" / "data.img")
    with pytest.raises(DriverError, match="template image .* is missing"):
        await driver.start(spec)
    assert files.data_cow.exists() and qemu_pids(spec.home) == []


async def test_a_database_with_a_raw_disk_copy_still_runs(driver, make_instance):
    """Databases (and clone pool copies) made before copy-on-write disks: a full raw copy."""
    import shutil

    from pgfleet.drivers.microvm.snapshot import copy_sparse, mark_unsynced

    tpl = driver._templates[(128, 1)]
    old = VmFiles(driver.pool.dir(tpl) / "ready-0-raw-copy")  # sorts before any new copy
    old.home.mkdir(parents=True)
    copy_sparse(tpl.files.ram, old.ram)
    copy_sparse(tpl.files.data, old.data)
    shutil.copyfile(tpl.files.console, old.console)
    shutil.copyfile(tpl.files.state, old.state)
    mark_unsynced(old.state)

    spec, backend = await make_instance()
    files = VmFiles(spec.home)
    assert files.disk == files.data and not files.data_cow.exists()
    assert not (tpl.dir / "users" / spec.uuid).exists()
    await query(backend, "CREATE TABLE kept AS SELECT 5 AS x", "tenant")
    await driver.suspend(spec)
    await driver.start(spec)  # restore on the raw disk
    await driver.stop(spec)
    await driver.start(spec)  # cold boot on it
    assert driver.last_timings.get("mode") == 1.0
    assert await query(backend, "SELECT x FROM kept", "tenant") == "5"
