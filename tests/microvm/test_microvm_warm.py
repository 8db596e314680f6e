"""The microvm driver's warm standby: QMP `stop` + its QEMU's memory cgroup squeezed, `cont`
on the thaw; a held session into the guest goes on; a new driver (a daemon restart) adopts
the paused VM; a guest burning CPU gets none while paused (the hostile case). Real QEMU under TCG: every test here costs seconds, so they are few."""

from __future__ import annotations

import asyncio
from pathlib import Path
import pytest

from pgfleet.drivers.microvm import MicroVMDriver

from .conftest import connect, query
from .test_microvm import qemu_pids

pytestmark = [pytest.mark.microvm, pytest.mark.asyncio(loop_scope="session")]


async def test_freeze_pauses_the_vm_in_its_cgroup_and_thaw_resumes_the_held_session(driver, make_instance):
    spec, backend = await make_instance()
    held = await connect(backend)
    try:
        await held.query("CREATE TABLE t AS SELECT 1 AS x")
        pid_before = await held.scalar("SELECT pg_backend_pid()")
        [qemu] = qemu_pids(spec.home)
        memory = driver._memory_dir(spec)
        # QEMU runs in the instance's own cgroups from its exec on (pgfleet-jail -j): the guest
        # cannot leave them, it does not even see the host
        assert str(qemu) in (memory / "cgroup.procs").read_text().split()
        await driver.freeze(spec)
        assert driver.is_frozen(spec)
        [(_, vm)] = [e for e in driver._vms.values() if e[0].uuid == spec.uuid]
        assert (await vm.qmp.execute("query-status"))["status"] == "paused"
        charged, _ = driver.memory_charged(spec)
        assert charged > 0
        # paused: the guest's vCPU gets no time, however it is asked (a query on the held
        # session waits for the thaw)
        pending = asyncio.ensure_future(held.scalar("SELECT sum(x) + 1 FROM t"))
        await asyncio.sleep(0)  # sent
        assert not pending.done()
        await driver.thaw(spec)
        assert not driver.is_frozen(spec)
        assert await asyncio.wait_for(pending, 60) == "2"
        assert await held.scalar("SELECT pg_backend_pid()") == pid_before
    finally:
        await held.close()
    # warm -> cold: a paused VM is snapshotted as it stands; its cgroup goes with its QEMU
    await driver.freeze(spec)
    await driver.suspend(spec)
    assert qemu_pids(spec.home) == [] and driver.memory_charged(spec) == (0, 0)
    assert not memory.exists()
    await driver.start(spec)
    assert await query(backend, "SELECT count(*) FROM t") == "1"


async def test_a_new_driver_adopts_a_paused_vm_and_thaws_it(driver, make_instance):
    """A daemon restart (or kill -9) with a warm microVM: the next daemon's driver re-attaches
    to the paused QEMU (the fleet keeps it warm) and its thaw resumes the held session."""
    spec, backend = await make_instance()
    held = await connect(backend)
    try:
        await held.query("CREATE TABLE t AS SELECT 7 AS x")
        await driver.freeze(spec)
        [qemu] = qemu_pids(spec.home)
        # the old driver lets go of it (as a dying daemon would), the VM stays paused
        [(_, vm)] = [e for e in driver._vms.values() if e[0].uuid == spec.uuid]
        driver._vms.pop(spec.uuid)
        vm.expected_exit = True
        await vm.close_qmp()
        restarted = MicroVMDriver(driver.state_dir)
        await restarted.prepare()
        try:
            assert await restarted.recover(spec) == backend
            assert restarted.is_frozen(spec) and qemu_pids(spec.home) == [qemu]
            await restarted.thaw(spec)
            assert await asyncio.wait_for(held.scalar("SELECT x FROM t"), 60) == "7"
        finally:
            await restarted.destroy(spec)
            await restarted.close()
    finally:
        await held.close()
    assert not driver._memory_dir(spec).exists()


def cpu_ticks(pid: int) -> int:
    """User + system clock ticks of a process, all its threads (vCPU included)."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(stat[11]) + int(stat[12])


async def test_a_guest_burning_cpu_gets_none_while_warm(driver, make_instance):
    """Hostile tenant: whatever runs in the guest (here a query spinning on the CPU) stops with
    the VM: a paused vCPU runs no instruction, and only the host's QMP socket resumes it."""
    spec, backend = await make_instance()
    [qemu] = qemu_pids(spec.home)
    burner = await connect(backend)
    try:
        spinning = asyncio.ensure_future(burner.scalar(
            "SELECT count(*) FROM generate_series(1, 100000000)"))
        window_s = 0.5  # a measuring window, not synchronisation
        before = cpu_ticks(qemu)
        await asyncio.sleep(window_s)
        running = cpu_ticks(qemu) - before
        await driver.freeze(spec)
        before = cpu_ticks(qemu)
        await asyncio.sleep(window_s)
        paused = cpu_ticks(qemu) - before
        assert not spinning.done()
        # running: 16-38 ticks of 50 here under a load of 20 on 2 cores; paused: 0
        assert running >= 5 and paused <= 1, f"ticks running {running}, paused {paused}"
        await driver.thaw(spec)
        spinning.cancel()
    finally:
        burner.writer.close()  # mid-query: no orderly goodbye
