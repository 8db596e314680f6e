"""Hostile tenants against warm standby: code running as the tenant gets no CPU while its
database is warm and cannot leave the freezer; memory it allocated is reclaimed; an idle
session held open cannot keep a warm database (or its memory) hostage."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from pgfleet.drivers.sandbox.procscan import find_postmaster
from pgfleet.fleet.memory import MemoryManager
from pgfleet.fleet.states import State

from ..test_warm_standby import aconnect, no_clients, scalar, until


def _tenant_process(fleet, name: str, script: str) -> subprocess.Popen:
    """A process as the tenant's code would run (its uid, namespaces, cgroups and freezer),
    in the background."""
    spec = fleet.spec(fleet.get(name))
    return subprocess.Popen(fleet.driver._sandboxed(spec, ["python3", "-c", script]), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, start_new_session=True)


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _child(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0])


def _end(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


async def test_tenant_code_gets_no_cpu_while_warm_and_cannot_leave_the_freezer(env):
    await env.fleet.create("spin")
    spinner = _tenant_process(env.fleet, "spin", "print('up', flush=True)\nwhile True: pass")
    try:
        assert spinner.stdout.readline().strip() == b"up"
        pid = _child(spinner.pid)
        # the tenant cannot move itself out of its freezer (root owns every cgroup file)
        escape = env.fleet.driver.exec_as_tenant(
            env.fleet.spec(env.fleet.get("spin")), ["sh", "-c", "echo $$ > /sys/fs/cgroup/freezer/cgroup.procs"])
        assert escape.returncode != 0
        await no_clients(env, "spin")
        row = await env.fleet.suspend("spin", tier="warm")
        assert row.standby_tier == "warm"
        before = _cpu_ticks(pid)
        time.sleep(0.5)  # a measurement window, not synchronisation: a spinner would use ~50 ticks
        assert _cpu_ticks(pid) == before, "a frozen tenant process must get no CPU"
        await env.fleet.resume("spin")
        deadline = time.monotonic() + 10
        while _cpu_ticks(pid) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _cpu_ticks(pid) > before  # thawed with its database
    finally:
        env.fleet.driver._freezer(env.fleet.spec(env.fleet.get("spin"))).thaw()
        _end(spinner)


async def test_memory_a_tenant_allocated_is_reclaimed_when_warm(env):
    from pgfleet.drivers import swap

    if swap.zswap_enabled() is None and not Path("/proc/swaps").exists():
        pytest.skip("SKIPPED LOUDLY: this kernel has no swap support")
    setup = swap.enable(env.home / "test-swapfile", 512 << 20) if swap.total_bytes() == 0 else None
    hog = None
    try:
        await env.fleet.create("hog")
        hog = _tenant_process(env.fleet, "hog", (
            "b = bytearray(48 << 20)\n"
            "for i in range(0, len(b), 4096): b[i] = 1\n"
            "print('up', flush=True)\n"
            "import time\ntime.sleep(600)"))
        assert hog.stdout.readline().strip() == b"up"
        running, _ = env.fleet.memory_charged(env.fleet.get("hog"))
        assert running > 48 << 20
        await no_clients(env, "hog")
        row = await env.fleet.suspend("hog", tier="warm")
        charged, swapped = env.fleet.memory_charged(row)
        assert charged < 16 << 20 and swapped > 40 << 20, (charged, swapped)
        # and it comes back whole
        await env.fleet.resume("hog")
        assert env.fleet.get("hog").state == State.RUNNING
    finally:
        if hog is not None:
            env.fleet.driver._freezer(env.fleet.spec(env.fleet.get("hog"))).thaw()
            _end(hog)
        if setup is not None:
            setup.undo()  # swap off, file gone, zswap as it was


async def test_a_held_idle_session_cannot_keep_a_warm_database_hostage(env):
    created = await env.fleet.create("hostage", policy="idle", cooldown_ms=100)
    c = await aconnect(env.proxy, "hostage", created.password)
    try:
        await c.execute("CREATE TABLE t AS SELECT 1 AS x")
        row = await env.fleet.wait_for("hostage", lambda r: r.standby_tier == "warm", timeout_s=30)
        assert row.state == State.STANDBY
        # the host needs the memory: the warm database goes cold although a session is open
        manager = MemoryManager(env.fleet, budget_bytes=1)
        await manager.tick()
        row = env.fleet.get("hostage")
        assert row.standby_tier == "cold"
        assert find_postmaster(env.fleet.driver.data_dir(env.fleet.spec(row))) is None
        with pytest.raises(psycopg.OperationalError):
            await scalar(c, "SELECT 1")  # its session ended with the server
    finally:
        await c.close()
    async with await aconnect(env.proxy, "hostage", created.password) as again:
        assert await scalar(again, "SELECT x FROM t") == 1
    # deleting a warm database with a session held leaves nothing behind either
    c = await aconnect(env.proxy, "hostage", created.password)
    try:
        await scalar(c, "SELECT 1")
        await until(lambda: env.fleet.get("hostage").standby_tier == "warm")
        spec = env.fleet.spec(env.fleet.get("hostage"))
        await env.fleet.delete("hostage")
        assert find_postmaster(env.fleet.driver.data_dir(spec)) is None
    finally:
        await c.close()
