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
    it did reach, so nothing is charged back while frozen; `restore_limit` undoes it."""
    if v2:
        # pgfleet keeps v2 databases out of swap while they run (memory.swap.max 0):
        # frozen, they may use it up to their memory limit
        max_bytes = (memory_dir / "memory.max").read_text().strip()
        (memory_dir / "memory.swap.max").write_text(max_bytes)
        current = _read_int(memory_dir / "memory.current")
        if current is not None and current > floor_bytes:
            try:
                (memory_dir / "memory.reclaim").write_text(str(current - floor_bytes))
            except OSError as exc:  # EAGAIN: reclaimed less than asked; fine
                if exc.errno not in (errno.EAGAIN, errno.EBUSY):
                    raise
        return _read_int(memory_dir / "memory.current") or 0
    limit = memory_dir / "memory.limit_in_bytes"
    try:
        limit.write_text(str(floor_bytes))
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        reached = _read_int(memory_dir / "memory.usage_in_bytes") or 0
        try:
            limit.write_text(str(reached + (256 << 10)))
        except OSError as exc2:
            if exc2.errno != errno.EBUSY:
                raise
    return _read_int(memory_dir / "memory.usage_in_bytes") or 0


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
