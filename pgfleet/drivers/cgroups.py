"""Per-instance cgroups, v1 (memory, pids, cpu controllers) or v2 (unified).

Limits: memory (the instance's memory_mb, swap included so a tenant cannot page the host
to death), pids (no fork bombs), CPU weight (fair share under contention).
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
#: every instance's cgroups live under <controller>/pgfleet/<home tag>/<uuid>
CGROUP_PARENT = "pgfleet"
PIDS_MAX = 256
CPU_PERIOD_US = 100_000  # postgres needs max_connections + ~10 auxiliary processes


@functools.cache
def is_v2(root: Path = ROOT) -> bool:
    """The host's cgroup version is fixed at boot: asked once per root (a wake asked it ten times)."""
    return (root / "cgroup.controllers").exists()


@functools.cache
def v1_controllers(root: Path = ROOT) -> tuple[str, ...]:
    """The v1 hierarchies of the controllers pgfleet uses that this host mounts."""
    return tuple(c for c in ("memory", "pids", "cpu") if (root / c).is_dir())


@dataclass(frozen=True)
class CgroupLimits:
    memory_bytes: int
    pids_max: int = PIDS_MAX
    cpu_weight: int = 100  # v2 scale 1..10000; v1 shares = weight * 1024 / 100
    cpu_pct: int = 0  # a hard cap, percent of one CPU per CPU_PERIOD_US; 0: none


class Cgroup:
    """The cgroup(s) of one instance under <controller>/<parent>/<name>."""

    def __init__(self, parent: str, name: str, root: Path = ROOT) -> None:
        self.v2 = is_v2(root)
        if self.v2:
            self.dirs = {"unified": root / parent / name}
        else:
            self.dirs = {c: root / c / parent / name for c in v1_controllers(root)}

    def create(self, limits: CgroupLimits) -> None:
        for controller, d in self.dirs.items():
            d.mkdir(parents=True, exist_ok=True)
            if self.v2:
                _enable_v2_controllers(d.parent)
                _write(d / "memory.max", str(limits.memory_bytes))
                _write(d / "memory.swap.max", "0", optional=True)
                _write(d / "pids.max", str(limits.pids_max))
                _write(d / "cpu.weight", str(limits.cpu_weight), optional=True)
                _write(d / "cpu.max", _cpu_max(limits.cpu_pct))
            elif controller == "memory":
                _write(d / "memory.limit_in_bytes", str(limits.memory_bytes))
                _write(d / "memory.memsw.limit_in_bytes", str(limits.memory_bytes), optional=True)
            elif controller == "pids":
                _write(d / "pids.max", str(limits.pids_max))
            elif controller == "cpu":
                _write(d / "cpu.shares", str(max(2, limits.cpu_weight * 1024 // 100)))
                _write(d / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(d / "cpu.cfs_quota_us", str(limits.cpu_pct * CPU_PERIOD_US // 100 if limits.cpu_pct else -1))

    def procs_files(self) -> list[str]:
        """Files a new process writes "0" into to join every controller (before exec)."""
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    def memory_current(self) -> int | None:
        d = self.dirs.get("unified") or self.dirs.get("memory")
        if d is None:
            return None
        name = "memory.current" if self.v2 else "memory.usage_in_bytes"
        try:
            return int((d / name).read_text())
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL every process in the cgroup(s) (cgroup.kill on v2, else one by one)."""
        for d in self.dirs.values():
            if (d / "cgroup.kill").exists():
                _write(d / "cgroup.kill", "1", optional=True)
                continue
            try:
                pids = (d / "cgroup.procs").read_text().split()
            except OSError:
                continue
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def remove(self) -> None:
        """Remove the (empty) cgroups; an instance in standby keeps nothing here."""
        for d in self.dirs.values():
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise


def home_tag(state_dir: Path) -> str:
    """A short name for one driver state directory: two pgfleet homes (or two drivers of one)
    on a host never share a cgroup parent."""
    import hashlib

    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]


def _cpu_max(cpu_pct: int) -> str:
    return f"{cpu_pct * CPU_PERIOD_US // 100} {CPU_PERIOD_US}" if cpu_pct else f"max {CPU_PERIOD_US}"


def _enable_v2_controllers(parent: Path) -> None:
    # Controllers must be enabled in every ancestor's subtree_control, from the top.
    chain = []
    p = parent
    while p != ROOT and ROOT in p.parents:
        chain.append(p)
        p = p.parent
    for d in [ROOT, *reversed(chain)]:
        _write(d / "cgroup.subtree_control", "+memory +pids +cpu", optional=True)


def _write(path: Path, value: str, optional: bool = False) -> None:
    try:
        path.write_text(value)
    except OSError:
        if not optional:
            raise


FAVOR_DYNMODS = "favordynmods"


def favor_migrations(mounts: Path = Path("/proc/self/mounts")) -> str:
    """Make moving a process into a cgroup cheap, and say what was done (for the log).

    Every database start moves its first process into the instance's cgroups, and by default
    each move waits for an RCU grace period (the kernel's threadgroup lock is biased towards
    fork and exit): 10-15 ms measured on every wake. The cgroup2 root option `favordynmods`
    (Linux 6.1+) biases it the other way, for the whole host, at a small cost to every fork and
    exit. It is a property of the one cgroup2 root, so it works on a v1 host too where a
    cgroup2 hierarchy is mounted (systemd's hybrid layout). The remount keeps every option the
    mount has."""
    for line in mounts.read_text().splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[2] != "cgroup2":
            continue
        target, options = fields[1], fields[3].split(",")
        if FAVOR_DYNMODS in options:
            return f"cgroup2 {target}: {FAVOR_DYNMODS} already on"
        wanted = ",".join(["remount", *[o for o in options if o not in ("rw", "ro")], FAVOR_DYNMODS])
        done = subprocess.run(["mount", "-o", wanted, target], capture_output=True, text=True)
        if done.returncode != 0:
            return f"cgroup2 {target}: could not turn {FAVOR_DYNMODS} on ({done.stderr.strip()[:200]}): " \
                   "every database start waits for an RCU grace period"
        return f"cgroup2 {target}: {FAVOR_DYNMODS} turned on (joining a cgroup no longer waits for an RCU grace period)"
    return "no cgroup2 mount: every database start waits for an RCU grace period to join its cgroups"
