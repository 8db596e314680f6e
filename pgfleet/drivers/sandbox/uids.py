"""Per-database uids, unique on the whole host (not per pgfleet home): two homes on one host,
or a home and anything else, must never run two tenants, or a tenant and another process, under
one uid. One registry per host: a file per allocated uid naming its owner (an instance's home
directory), allocated under an exclusive lock; a uid is given out only if no entry holds it, no
process runs under it, and no passwd entry names it. An entry whose owner directory is gone and
whose uid runs nothing is stale (a home removed without pgfleet) and is reused.
"""

from __future__ import annotations

import fcntl
import os
import pwd
from pathlib import Path

REGISTRY = Path("/var/lib/pgfleet-uids")  # host-wide, whatever the home; root-only (0700)
UID_FIRST = 3_000_000
UID_LAST = 3_999_999


def _running_uids() -> set[int]:
    """Effective uids of every process on the host (/proc/<pid> is owned by it)."""
    uids = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                uids.add(entry.stat(follow_symlinks=False).st_uid)
            except OSError:
                pass
    return uids


def _has_passwd_entry(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


class UidRegistry:
    def __init__(self, root: Path = REGISTRY) -> None:
        self.root = root

    def _locked(self) -> int:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _owner(self, uid: int) -> str | None:
        try:
            return (self.root / str(uid)).read_text()
        except FileNotFoundError:
            return None

    def allocate(self, owner: Path) -> int:
        """A uid for `owner` (an instance's home, which must exist), recorded host-wide."""
        owner_s = os.path.realpath(owner)
        fd = self._locked()
        try:
            taken = {int(n) for n in os.listdir(self.root) if n.isdigit()}
            running = _running_uids()
            for uid in range(UID_FIRST, UID_LAST + 1):
                if uid in running or _has_passwd_entry(uid):
                    continue
                if uid in taken:
                    held_by = self._owner(uid)
                    if held_by == owner_s:
                        return uid  # an interrupted create of this very instance
                    if held_by is not None and os.path.exists(held_by):
                        continue
                tmp = self.root / f".{uid}.tmp"
                tmp.write_text(owner_s)
                tmp.rename(self.root / str(uid))
                return uid
            raise RuntimeError(f"no free uid left in {UID_FIRST}..{UID_LAST}")
        finally:
            os.close(fd)

    def claim(self, uid: int, owner: Path) -> None:
        """Record a uid an instance already has (made before this registry existed); refuse
        one that another live instance holds."""
        owner_s = os.path.realpath(owner)
        fd = self._locked()
        try:
            held_by = self._owner(uid)
            if held_by == owner_s:
                return
            if held_by is not None and os.path.exists(held_by):
                raise RuntimeError(f"uid {uid} of {owner_s} is also allocated to {held_by}")
            tmp = self.root / f".{uid}.tmp"
            tmp.write_text(owner_s)
            tmp.rename(self.root / str(uid))
        finally:
            os.close(fd)

    def release(self, uid: int, owner: Path) -> None:
        """Give `uid` back, if `owner` holds it."""
        fd = self._locked()
        try:
            if self._owner(uid) == os.path.realpath(owner):
                (self.root / str(uid)).unlink()
        finally:
            os.close(fd)
