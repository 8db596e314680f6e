"""A copy-on-write store for the databases' files, made only when asked (`pgfleet up --cow-image SIZE`).

A branch of "now" copies the parent's files (its overlay upper layer or data directory) and
the WAL segments its recovery needs. On a file system with reflinks (XFS with reflink=1,
btrfs) safecopy turns each copy into a clone: shared extents, O(metadata) whatever the
size, and writes on either side copy only the blocks they change. A production host puts
the home on such a file system. A host without one (ext4 here) can get one from pgfleet:
a sparse image file `<home>/cow.img` formatted XFS with reflinks, loop-mounted at
`<home>/cow`, where `instances/` and `backups/` live (`<home>/instances` and
`<home>/backups` are root-owned symlinks to them, so every path stays as it was). The image
stays mounted across daemon restarts (databases may outlive the daemon); the next `up`
mounts it again after a reboot, whether the flag is given or not: the image is the record.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_NAME = "cow.img"
MOUNT_NAME = "cow"
#: the home's directories that hold databases' files (instance homes, archive repositories)
SHARED_DIRS = ("instances", "backups")
MIN_BYTES = 300 << 20  # mkfs.xfs refuses smaller file systems
FICLONE = 0x40049409


class CowStoreError(RuntimeError):
    """The copy-on-write store cannot be made or mounted (one line for the operator)."""


@dataclass(frozen=True)
class BranchStorage:
    """What `status` says about how a branch copies its parent's files."""

    mode: str  # "reflink" (copy-on-write clones) or "copy"
    image: str | None  # the store's image file, when pgfleet made one
    path: str  # where the databases' files are

    def to_json(self) -> dict:
        return {"mode": self.mode, "image": self.image, "path": self.path}


def image_of(home: Path) -> Path:
    return home / IMAGE_NAME


def mount_point(home: Path) -> Path:
    return home / MOUNT_NAME


def prepare(home: Path, size_bytes: int | None) -> BranchStorage:
    """Make (when `size_bytes` is given and there is no image yet) and mount the store,
    and point the home's shared directories at it; without an image, nothing changes.
    Returns how branches will copy."""
    image = image_of(home)
    if size_bytes is not None and not image.exists():
        _create(home, image, size_bytes)
    if image.exists():
        _mount(image, mount_point(home))
        _link_shared_dirs(home)
    where = home / SHARED_DIRS[0]
    where.mkdir(mode=0o711, parents=True, exist_ok=True)
    storage = BranchStorage("reflink" if reflinks(where) else "copy", str(image) if image.exists() else None,
                            str(where.resolve()))
    log.info("branches copy the parent's files as %s (databases' files in %s)",
             "copy-on-write clones (reflink)" if storage.mode == "reflink" else "plain copies", storage.path)
    return storage


def _create(home: Path, image: Path, size_bytes: int) -> None:
    if size_bytes < MIN_BYTES:
        raise CowStoreError(f"--cow-image: at least {MIN_BYTES >> 20} MiB (XFS's minimum)")
    for name in SHARED_DIRS:
        path = home / name
        if path.is_dir() and not path.is_symlink() and any(path.iterdir()):
            raise CowStoreError(f"--cow-image: {path} already holds databases' files; a copy-on-write store "
                                f"is made for a fresh home (or put the whole home on XFS/btrfs)")
    _need("mkfs.xfs", "xfsprogs")
    tmp = image.with_name(f".{image.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, size_bytes)  # sparse: it takes disk space only as databases write
    finally:
        os.close(fd)
    try:
        _run("mkfs.xfs", "-q", "-m", "reflink=1", str(tmp))
        tmp.rename(image)  # the image exists only once it is a file system
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("made a copy-on-write store for the databases' files: %s (%d MiB, XFS with reflinks)",
             image, size_bytes >> 20)


def _mount(image: Path, target: Path) -> None:
    target.mkdir(mode=0o711, exist_ok=True)
    if is_mounted(target):
        return
    _run("mount", "-o", "loop,noatime", str(image), str(target))
    os.chmod(target, 0o711)  # the root of the new file system: instance homes below are 0711 too


def _link_shared_dirs(home: Path) -> None:
    for name in SHARED_DIRS:
        inside = mount_point(home) / name
        inside.mkdir(mode=0o711, exist_ok=True)
        link = home / name
        if link.is_symlink():
            if os.readlink(link) == str(inside):
                continue
            link.unlink()
        elif link.is_dir():
            link.rmdir()  # empty (checked when the store was made): nothing is lost
        os.symlink(inside, link)


def is_mounted(path: Path) -> bool:
    wanted = str(path.absolute())
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    return any(line.split()[4] == wanted for line in lines)


def unmount(home: Path) -> bool:
    """Unmount the store (a home that is being removed); False if it is still in use."""
    target = mount_point(home)
    if not is_mounted(target):
        return True
    proc = subprocess.run(["umount", str(target)], capture_output=True, text=True)
    if proc.returncode != 0:
        log.warning("the copy-on-write store %s stays mounted: %s", target, proc.stderr.strip())
        return False
    return True


def reflinks(directory: Path) -> bool:
    """Whether files in `directory` can be cloned (a probe: two temporary files, one FICLONE)."""
    try:
        with tempfile.TemporaryFile(dir=directory) as src, tempfile.TemporaryFile(dir=directory) as dst:
            src.write(b"\0" * 4096)
            src.flush()
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            return True
    except OSError:
        return False


def _need(tool: str, package: str) -> None:
    from shutil import which

    if which(tool) is None:
        raise CowStoreError(f"--cow-image needs {tool} (apt-get install {package})")


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CowStoreError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.returncode}")
