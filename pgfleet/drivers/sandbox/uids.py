"""Per-database uids, unique on the whole host (not per pgfleet home): two homes on one host,
or a home and anything else, must never run two tenants, or a tenant and another process, under
one uid. One registry per host: a file per allocated uid naming its owner (an instance's home
directory), allocated under an exclusive lock; a uid is given out only if no entry holds it, no
process runs under it, and no passwd entry names it. An entry whose owner directory is gone and
whose uid runs nothing is stale (a home removed without pgfleet) and is reused.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
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


class _UnusedUids:
    """uid -> no process runs under it and no passwd entry names it (the processes are
    scanned once, at the first question)."""

    def __init__(self) -> None:
        self._running: set[int] | None = None

    def __call__(self, uid: int) -> bool:
        if self._running is None:
            self._running = _running_uids()
        return uid not in self._running and not _has_passwd_entry(uid)


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
        """A uid for `owner` (an instance's home, which must exist), recorded host-wide.

        A uid no entry has ever held comes first, counting on from the last one given (a hint
        file: no listing of the registry, one process scan and one passwd lookup per candidate:
        a host with 10,000 databases allocates as fast as an empty one); past the end of the
        range, from the highest held, then from the start (one listing). Only when none is left
        is a stale entry's uid (its owner directory gone, nothing running under it) given again:
        a fresh uid can own no forgotten file."""
        owner_s = os.path.realpath(owner)
        fd = self._locked()
        try:
            mine = self._uid_of_owner(owner_s)
            if mine is not None:
                return mine  # an interrupted create of this very instance
            unused = _UnusedUids()
            hint = self._next_hint()
            if hint is not None:
                for uid in range(hint, UID_LAST + 1):
                    if not (self.root / str(uid)).exists() and unused(uid):
                        return self._record(uid, owner_s)
            taken = {int(n) for n in os.listdir(self.root) if n.isdigit()}
            after = max(taken, default=UID_FIRST - 1) + 1
            for uid in itertools.chain(range(after, UID_LAST + 1), range(UID_FIRST, after)):
                if uid not in taken and unused(uid):
                    return self._record(uid, owner_s)
            for uid in sorted(taken):
                held_by = self._owner(uid)
                if held_by == owner_s:
                    return uid
                stale = held_by is None or not os.path.exists(held_by)
                if stale and unused(uid):
                    return self._record(uid, owner_s)
            raise RuntimeError(f"no free uid left in {UID_FIRST}..{UID_LAST}")
        finally:
            os.close(fd)

    def _owner_key(self, owner_s: str) -> Path:
        """The owner's side of the record: which uid it holds, found without listing."""
        return self.root / "owners" / hashlib.sha256(owner_s.encode()).hexdigest()[:32]

    def _uid_of_owner(self, owner_s: str) -> int | None:
        try:
            uid = int(self._owner_key(owner_s).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return uid if self._owner(uid) == owner_s else None

    def _next_hint(self) -> int | None:
        """Where the last fresh allocation left off (None: unknown, or past the range)."""
        try:
            hint = int((self.root / ".next").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return hint if UID_FIRST <= hint <= UID_LAST else None

    def _record(self, uid: int, owner_s: str) -> int:
        for path, text in ((self.root / str(uid), owner_s), (self._owner_key(owner_s), str(uid))):
            path.parent.mkdir(mode=0o700, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text)
            tmp.rename(path)
        hint = self.root / ".next"
        if uid >= (self._next_hint() or UID_FIRST):
            hint.with_name(".next.tmp").write_text(str(uid + 1))
            hint.with_name(".next.tmp").rename(hint)
        return uid

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
            self._record(uid, owner_s)
        finally:
            os.close(fd)

    def release(self, uid: int, owner: Path) -> None:
        """Give `uid` back, if `owner` holds it."""
        fd = self._locked()
        try:
            owner_s = os.path.realpath(owner)
            if self._owner(uid) == owner_s:
                (self.root / str(uid)).unlink()
                self._owner_key(owner_s).unlink(missing_ok=True)
        finally:
            os.close(fd)
