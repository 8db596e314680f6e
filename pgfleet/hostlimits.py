"""Will this host hold the fleet it is configured for? Kernel and process limits against the
quotas (how many databases, how many awake at once).

Every awake sandbox database is a postmaster and ~6 more processes, in its own mount, PID,
IPC, UTS and network namespaces, with one overlay mount, and the proxy holds a few file
descriptors per client. These are the host limits that run out first at thousands of
databases; `up` logs a clear warning for each one that is too low, and `status` shows the
headroom of each.
"""

from __future__ import annotations

import resource
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

PROCESSES_PER_AWAKE = 10  # postmaster, checkpointer, bgwriter, walwriter, autovacuum, logical launcher, stats + sessions
FDS_PER_AWAKE = 16  # the daemon's: client and server sockets of a few sessions, pidfd, log
MIN_FREE_DISK_PER_DATABASE = 2 * 1024 * 1024  # a fresh copy-on-write database; more once it has data


@dataclass(frozen=True)
class Check:
    name: str
    have: int
    need: int
    what: str  # where the limit is set

    @property
    def ok(self) -> bool:
        return self.have >= self.need

    def message(self) -> str:
        return (f"{self.name}: {self.have} available, {self.need} needed for the configured fleet "
                f"({self.what})")

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok, "headroom": self.have - self.need}


def _sysctl(name: str) -> int | None:
    try:
        return int(Path("/proc/sys", name.replace(".", "/")).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def checks(home: Path, instances: int, live_instances: int) -> list[Check]:
    """Each host limit against what `instances` defined and `live_instances` awake need."""
    out: list[Check] = []
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    out.append(Check("open files (daemon)", soft, 256 + live_instances * FDS_PER_AWAKE,
                     "ulimit -n / LimitNOFILE; the daemon raises its soft limit to the hard one"))
    for sysctl, per in (("kernel.pid_max", PROCESSES_PER_AWAKE), ("kernel.threads-max", PROCESSES_PER_AWAKE)):
        value = _sysctl(sysctl)
        if value is not None:
            out.append(Check(sysctl, value, 4096 + live_instances * per, f"sysctl {sysctl}"))
    value = _sysctl("fs.file-max")
    if value is not None:
        out.append(Check("fs.file-max", value, 65536 + live_instances * 64, "sysctl fs.file-max"))
    value = _sysctl("fs.mount-max")
    if value is not None:
        out.append(Check("fs.mount-max", value, 1000 + live_instances, "sysctl fs.mount-max (mounts per namespace)"))
    for kind in ("mnt", "pid", "net", "ipc", "uts"):
        value = _sysctl(f"user.max_{kind}_namespaces")
        if value is not None:
            out.append(Check(f"user.max_{kind}_namespaces", value, 64 + live_instances,
                             f"sysctl user.max_{kind}_namespaces"))
    try:
        free = shutil.disk_usage(home).free
        out.append(Check("disk free (MiB)", free >> 20, (instances * MIN_FREE_DISK_PER_DATABASE) >> 20,
                         f"the file system of {home}"))
    except OSError:
        pass
    return out


def problems(found: list[Check]) -> list[str]:
    return [c.message() for c in found if not c.ok]

