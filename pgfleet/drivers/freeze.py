"""Warm standby, for every driver that runs an instance in cgroups of its own: freeze a
database's processes (the sandbox: its postgres; the microvm driver reclaims only, its
QEMU is paused over QMP) and reclaim its memory.

A frozen database keeps its processes and their sockets (so client sessions survive) but
gets no CPU; with swap on the host its memory is pushed out (zswap-compressed where the
kernel has it) by lowering its cgroup's limit while it is frozen (cgroup v1; `memory.force_empty`
does nothing useful for frozen tasks) or by `memory.reclaim` (v2). A thaw restores the limit
first, then lets the processes run: about a millisecond, plus the page faults of the first
query (measured: /work/shared/notes/density-feasibility.md).

The processes join the freezer when they start (cgroup v1 has its own `freezer` hierarchy;
v2 freezes the unified cgroup itself), so no process can escape a freeze by forking during it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from pathlib import Path

from .cgroups import ROOT, is_v2

log = logging.getLogger(__name__)

#: a freeze that has not completed by then is undone (a task stuck in the kernel, or a tenant
#: racing it): the database goes cold instead of being held half frozen
FREEZE_TIMEOUT_S = 2.0
#: what the reclaim aims to leave charged: page tables, kernel stacks, sockets stay
RECLAIM_FLOOR_BYTES = 1 << 20


class FreezeFailed(RuntimeError):
    pass


def freezer_available(root: Path = ROOT) -> bool:
    return is_v2(root) or (root / "freezer" / "freezer.state").exists() or (root / "freezer").is_dir()


class Freezer:
    """The freezer of one instance: <root>/freezer/<parent>/<name> (v1) or the unified cgroup (v2)."""

    def __init__(self, parent: str, name: str, root: Path = ROOT) -> None:
        self.v2 = is_v2(root)
        self.dir = root / parent / name if self.v2 else root / "freezer" / parent / name

    def create(self) -> None:
        if not self.v2:  # v2: the unified cgroup exists already (cgroups.Cgroup made it)
            self.dir.mkdir(parents=True, exist_ok=True)

    def procs_files(self) -> list[str]:
        """Files a new process writes "0" into, between fork and exec, to join the freezer."""
        return [] if self.v2 else [str(self.dir / "cgroup.procs")]

    def _control(self) -> Path:
        return self.dir / ("cgroup.freeze" if self.v2 else "freezer.state")

    def state(self) -> str:
        """THAWED, FREEZING or FROZEN (v2's `cgroup.events` frozen flag mapped to the same)."""
        try:
            if not self.v2:
                return (self.dir / "freezer.state").read_text().strip()
            wanted = (self.dir / "cgroup.freeze").read_text().strip() == "1"
            frozen = "frozen 1" in (self.dir / "cgroup.events").read_text()
        except OSError:
            return "THAWED"
        return "FROZEN" if frozen else ("FREEZING" if wanted else "THAWED")

    def is_frozen(self) -> bool:
        return self.state() != "THAWED"

    async def freeze(self, timeout_s: float = FREEZE_TIMEOUT_S) -> None:
        """Freeze every process; undone (and FreezeFailed raised) if it does not complete in time."""
        self._control().write_text("1" if self.v2 else "FROZEN")
        deadline = time.monotonic() + timeout_s
        delay = 0.0005
        while self.state() != "FROZEN":
            if time.monotonic() > deadline:
                self.thaw()
                raise FreezeFailed(f"processes not frozen after {timeout_s:.1f}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)

    def thaw(self) -> None:
        try:
            self._control().write_text("0" if self.v2 else "THAWED")
        except FileNotFoundError:
            pass  # no cgroup: nothing is frozen

    def remove(self) -> None:
        if self.v2:
            return  # the unified cgroup is removed with the others
        try:
            self.dir.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise


def reclaim(memory_dir: Path, v2: bool, floor_bytes: int = RECLAIM_FLOOR_BYTES) -> int:
    """Push a frozen cgroup's memory out to swap; returns the bytes still charged.

    Blocking (the kernel reclaims inside the write): run it on a worker thread. v1 lowers
    `memory.limit_in_bytes` to the floor and, where the kernel cannot get that low, to what
    it did reach, so nothing is charged back while frozen; `restore_limit` undoes it. One
    pass often stops early (measured: 4.4 MiB left after the first, 2.2 after a second, with
    shared buffers half written out), so passes repeat while they still free something."""
    if v2:
        # pgfleet keeps v2 databases out of swap while they run (memory.swap.max 0):
        # frozen, they may use it up to their memory limit
        max_bytes = (memory_dir / "memory.max").read_text().strip()
        (memory_dir / "memory.swap.max").write_text(max_bytes)
    charged = _read_int(memory_dir / ("memory.current" if v2 else "memory.usage_in_bytes")) or 0
    for _ in range(RECLAIM_PASSES):
        before = charged
        charged = _reclaim_pass_v2(memory_dir, floor_bytes) if v2 else _reclaim_pass_v1(memory_dir, floor_bytes)
        if before - charged < RECLAIM_PROGRESS_BYTES:
            break
    return charged


#: passes of reclaim at most, each after one that freed at least RECLAIM_PROGRESS_BYTES
RECLAIM_PASSES = 4
RECLAIM_PROGRESS_BYTES = 128 << 10


def _reclaim_pass_v2(memory_dir: Path, floor_bytes: int) -> int:
    current = _read_int(memory_dir / "memory.current")
    if current is not None and current > floor_bytes:
        try:
            (memory_dir / "memory.reclaim").write_text(str(current - floor_bytes))
        except OSError as exc:  # EAGAIN: reclaimed less than asked; fine
            if exc.errno not in (errno.EAGAIN, errno.EBUSY):
                raise
    return _read_int(memory_dir / "memory.current") or 0


def _reclaim_pass_v1(memory_dir: Path, floor_bytes: int) -> int:
    """Lower the limit to the floor; where the kernel gives up on the way (it does, with
    shared memory and swap cache left: measured 4.4-6.3 MiB charged), step down from what it
    reached 512 KiB at a time while that still frees memory: the kernel refuses one big step
    but takes small ones (measured: 2.1 MiB, all of it kernel memory). The limit ends just
    above what is charged, so nothing is charged back while frozen."""
    limit = memory_dir / "memory.limit_in_bytes"
    usage = memory_dir / "memory.usage_in_bytes"
    # force_empty first: it drains the per-CPU LRU batches, where the pages the processes
    # touched last before the freeze wait, out of reclaim's sight (without it: 6.3 MiB left)
    try:
        (memory_dir / "memory.force_empty").write_text("0")
    except OSError:
        pass  # not on this kernel: the steps below do what they can
    _write_limit(limit, floor_bytes)
    stalled = 0
    for _ in range(RECLAIM_STEPS):
        reached = _read_int(usage) or 0
        if reached <= floor_bytes + RECLAIM_SLACK_BYTES:
            break
        _write_limit(limit, max(floor_bytes, reached - RECLAIM_STEP_BYTES))
        # a step may only move just-frozen pages to the inactive list; the next evicts them
        stalled = stalled + 1 if (_read_int(usage) or 0) > reached - RECLAIM_SLACK_BYTES else 0
        if stalled == RECLAIM_STALLS:
            break  # what is left is the kernel's own (page tables, stacks)
    _write_limit(limit, (_read_int(usage) or 0) + RECLAIM_SLACK_BYTES * 4)
    return _read_int(usage) or 0


#: the v1 step-down: steps at most, how much each asks the kernel to free, and the least
#: a step must free for the next to be tried
RECLAIM_STEPS = 64
RECLAIM_STEP_BYTES = 512 << 10
RECLAIM_SLACK_BYTES = 64 << 10
RECLAIM_STALLS = 3


def _write_limit(limit: Path, value: int) -> bool:
    """False where the kernel could not reclaim down to `value` (EBUSY)."""
    try:
        limit.write_text(str(value))
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        return False
    return True


async def push_out(memory_dir: Path, v2: bool, with_swap: bool) -> int:
    """What a frozen cgroup still has charged once its memory is pushed out: reclaimed on a
    worker thread with swap (the warm mode "reclaim"), only measured without it ("freeze")."""
    if with_swap:
        return await asyncio.to_thread(reclaim, memory_dir, v2)
    return charged_bytes(memory_dir, v2)[0]


def restore_limit(memory_dir: Path, v2: bool, limit_bytes: int) -> None:
    """Give a thawed cgroup its memory limit back (v1), or its no-swap rule (v2)."""
    if v2:
        try:
            (memory_dir / "memory.swap.max").write_text("0")
        except FileNotFoundError:
            pass
        return
    try:
        (memory_dir / "memory.limit_in_bytes").write_text(str(limit_bytes))
    except FileNotFoundError:
        pass


def charged_bytes(memory_dir: Path, v2: bool) -> tuple[int, int]:
    """(memory charged, swap used) of one cgroup."""
    if v2:
        return (_read_int(memory_dir / "memory.current") or 0,
                _read_int(memory_dir / "memory.swap.current") or 0)
    mem = _read_int(memory_dir / "memory.usage_in_bytes") or 0
    memsw = _read_int(memory_dir / "memory.memsw.usage_in_bytes")
    return mem, max(0, (memsw or mem) - mem)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None
