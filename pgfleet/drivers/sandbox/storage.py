"""Copy-on-write data directories: each database's data directory is an overlayfs mount
with the shared template as its read-only lower layer and a per-database upper directory.

A fresh database owns a few empty directories (no copy of the 27 MB template); after its
first start its upper directory holds ~1-4 MB (a WAL segment, pg_control, the catalog
files it changed: overlayfs copies up whole files, and the template's files are small).
The overlay is mounted by the driver just before Postgres starts (the database's private
mount namespace inherits it) and unmounted once Postgres has exited, so a database in
standby holds no mount.

Layout under the instance's home (root-owned, 0711):
  upper/   the database's own files (its root: the instance uid, 0700: Postgres' data
           directory checks see it as the merged root)
  work/    overlayfs' scratch directory (root, 0700)
  data/    the mount point (root, 0700 when nothing is mounted)
  storage.json  which lower layer this database was made from (root, 0600): a later
           template (another Postgres minor version) never changes an existing database

The lower layer is a copy of the template whose files are readable and writable by every
uid (0666/0777): overlayfs checks the caller's permission on the merged inode, which keeps
the lower file's owner and mode, and each database runs as its own uid. Writes never reach
the lower layer (they are copied up), and the lower directory itself is 0700 root, so no
tenant can open it except through its own overlay. A home made before overlays (a full
copy in data/, no upper/) keeps working as it is.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..base import DriverError
from ..untrusted import write_root_file

LOWER_SUFFIX = ".lower"
MNT_DETACH = 2
#: a walk of an upper directory stops counting after this many entries: a tenant that
#: makes millions of empty files cannot make `db show` slow (its usage is then a lower bound)
MAX_WALK_ENTRIES = 200_000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


@dataclass(frozen=True)
class Layout:
    home: Path

    @property
    def upper(self) -> Path:
        return self.home / "upper"

    @property
    def work(self) -> Path:
        return self.home / "work"

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def record(self) -> Path:
        return self.home / "storage.json"


def overlay_supported() -> bool:
    try:
        return any(line.split()[-1] == "overlay" for line in Path("/proc/filesystems").read_text().splitlines())
    except OSError:
        return False


async def ensure_lower(template: Path) -> Path:
    """The shared lower layer made from `template` (once, atomically): its files open to
    every uid, its top directory private to root."""
    lower = template.with_name(template.name + LOWER_SUFFIX)
    if (lower / "PG_VERSION").exists():
        return lower
    # a private work directory: daemons starting at once each build their own, one rename wins
    work = Path(tempfile.mkdtemp(prefix=f".{lower.name}.", dir=template.parent)) / "tree"
    proc = await asyncio.create_subprocess_exec(
        "cp", "-a", str(template), str(work), stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    try:
        if proc.returncode != 0:
            raise DriverError(f"making the shared template layer failed: {err.decode(errors='replace').strip()}")
        await asyncio.to_thread(_open_modes, work)
        os.chown(work, 0, 0)
        os.chmod(work, 0o700)
        os.sync()
        try:
            work.rename(lower)
        except OSError:
            if not (lower / "PG_VERSION").exists():  # not another daemon's finished layer
                raise
    finally:
        shutil.rmtree(work.parent, ignore_errors=True)
    return lower


def _open_modes(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666)


class OverlayStorage:
    """Provisions, mounts, measures and removes overlay data directories."""

    def __init__(self, lower: Path | None) -> None:
        #: None where the kernel has no overlayfs: databases get a full copy (the old way)
        self.lower = lower

    @staticmethod
    def layout(home: Path) -> Layout:
        return Layout(home)

    def is_overlay(self, home: Path) -> bool:
        return self.layout(home).upper.is_dir()

    def provision(self, home: Path, uid: int) -> None:
        """A database's storage, ready to mount: three directories and a record. No copy."""
        if self.lower is None:
            raise DriverError("overlayfs is not available on this host")
        lay = self.layout(home)
        home.mkdir(parents=True, exist_ok=True)
        os.chmod(home, 0o711)
        for path in (lay.work, lay.data):
            path.mkdir(mode=0o700, exist_ok=True)
        lay.upper.mkdir(mode=0o700, exist_ok=True)
        os.chown(lay.upper, uid, uid)
        write_root_file(lay.record, json.dumps({"kind": "overlay", "lower": str(self.lower)}))

    def _lower_of(self, lay: Layout) -> str:
        try:
            lower = json.loads(lay.record.read_text())["lower"]
        except FileNotFoundError:
            # not fsynced at create (SQLite's commit right after flushes ext4's journal
            # with it); should a crash still lose it, today's layer is the likeliest one
            if self.lower is None:
                raise DriverError(f"{lay.record} is missing") from None
            lower = str(self.lower)
        except (OSError, ValueError, KeyError) as exc:
            raise DriverError(f"{lay.record}: unreadable storage record: {exc}") from None
        if not (Path(lower) / "PG_VERSION").exists():
            raise DriverError(f"the template layer {lower} of this database is missing")
        return lower

    def mount(self, home: Path) -> None:
        """Mount the overlay on data/ (idempotent: a mount left by a crash is kept)."""
        lay = self.layout(home)
        if not self.is_overlay(home) or os.path.ismount(lay.data):
            return
        lower = self._lower_of(lay)
        for p in (lower, str(lay.upper), str(lay.work)):
            if any(c in p for c in ",:\\"):
                raise DriverError(f"overlayfs cannot take the path {p!r} (',' ':' or '\\\\' in it)")
        options = f"lowerdir={lower},upperdir={lay.upper},workdir={lay.work},redirect_dir=off,metacopy=off"
        if _libc.mount(b"overlay", str(lay.data).encode(), b"overlay", 0, options.encode()) != 0:
            err = ctypes.get_errno()
            raise DriverError(f"mounting the data directory of {home.name} failed: {os.strerror(err)}")

    def unmount(self, home: Path) -> None:
        """Unmount data/ if mounted. Lazily if still busy: the mount is gone from the host's
        view at once and the kernel frees it when the last user lets go."""
        target = str(self.layout(home).data).encode()
        if not os.path.ismount(self.layout(home).data):
            return
        if _libc.umount2(target, 0) != 0:
            err = ctypes.get_errno()
            if err == errno.EBUSY and _libc.umount2(target, MNT_DETACH) == 0:
                return
            if err not in (errno.EINVAL, errno.ENOENT):
                raise DriverError(f"unmounting the data directory of {home.name} failed: {os.strerror(err)}")

    def disk_bytes(self, home: Path) -> int:
        """What the database really owns on disk: its upper directory (or, for a full copy,
        its data directory), in allocated blocks. Never follows a symlink: the tree is the
        tenant's."""
        lay = self.layout(home)
        return _allocated(lay.upper if self.is_overlay(home) else lay.data)

    def destroy(self, home: Path) -> None:
        self.unmount(home)
        shutil.rmtree(home, ignore_errors=True)  # fd-based on Linux: symlinks are removed, not followed


def mounted_data_dirs(under: Path) -> list[Path]:
    """Overlay mounts on `<under>/<uuid>/data` in the host's mount table (left by a crash)."""
    prefix = os.path.realpath(under) + "/"
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        if point.startswith(prefix) and point.endswith("/data") and " - overlay " in line:
            found.append(Path(point))
    return found


def _allocated(root: Path) -> int:
    total, seen = 0, 0
    stack = [str(root)]
    while stack and seen < MAX_WALK_ENTRIES:
        path = stack.pop()
        try:
            it = os.scandir(path)
        except OSError:
            continue
        with it:
            for entry in it:
                seen += 1
                if seen > MAX_WALK_ENTRIES:
                    break
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                total += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return total
