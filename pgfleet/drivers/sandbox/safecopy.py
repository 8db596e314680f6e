"""Copying a tenant's files as root without trusting them.

A data directory belongs to its tenant's uid, and a tenant may run code as that uid: while
root copies it (a base backup, a branch) the tenant can plant symlinks, FIFOs, devices or
swap a directory for a symlink between two system calls. So every step goes through file
descriptors: directories are opened O_NOFOLLOW|O_DIRECTORY and walked by fd, files are
opened O_NOFOLLOW|O_NONBLOCK (a FIFO cannot block us) and checked with fstat on the open
descriptor; anything but a directory or a regular file is skipped and reported. A file is
copied up to the size it had when opened (it cannot grow the copy without bound), and the
copy is created O_EXCL inside a directory only root can write, then handed to `uid`.
Blocking I/O: call these from a worker thread (asyncio.to_thread).
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
CHUNK = 8 << 20
FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)

#: (path relative to the source root, is a directory) -> leave it out
Exclude = Callable[[str, bool], bool]


class UnsafeFile(OSError):
    """A file that should be a regular file is not (a symlink, a FIFO, a device...)."""


@dataclass
class CopyStats:
    files: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)


def open_dir(path: Path | str, dir_fd: int | None = None) -> int:
    """An fd of a real directory (never through a symlink at its last component)."""
    return os.open(path, DIR_FLAGS, dir_fd=dir_fd)


def open_regular(name: str, dir_fd: int | None = None, max_bytes: int | None = None) -> tuple[int, int]:
    """(fd, size) of a regular file opened without following a symlink or blocking on a FIFO."""
    fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(f"{name} is not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise UnsafeFile(f"{name} is larger than {max_bytes} bytes")
        return fd, st.st_size
    except BaseException:
        os.close(fd)
        raise


def clone_fd(src: int, dst: int, size: int) -> bool:
    """Make `dst` share `src`'s first `size` bytes (one FICLONERANGE: XFS with reflink=1,
    btrfs); False where the file system cannot (ext4, across file systems) or the range
    no longer ends at the file's end (it grew since it was opened: copied up to `size`)."""
    if size == 0:
        return True  # a length of 0 would mean "to the end", past the size at open
    try:
        fcntl.ioctl(dst, FICLONERANGE, struct.pack("qQQQ", src, 0, size, 0))
    except OSError:
        return False
    return True


def copy_fd(src: int, dst: int, size: int) -> int:
    """Copy up to `size` bytes: one clone where the file system can, else copy_file_range
    (which some file systems still turn into shared extents), else plain reads."""
    if clone_fd(src, dst, size):
        return size
    done = 0
    while done < size:
        try:
            n = os.copy_file_range(src, dst, min(CHUNK, size - done))
        except OSError:  # across file systems on old kernels: plain reads
            data = os.read(src, min(CHUNK, size - done))
            n = len(data) and os.write(dst, data)
        if n == 0:
            break  # the file shrank while we copied it
        done += n
    return done


def copy_file(name: str, src_dir: int, dst_dir: int, uid: int | None, max_bytes: int | None = None,
              dst_name: str | None = None, overwrite: bool = False, fsync: bool = False) -> int:
    """Copy one regular file between two directory fds; returns the bytes copied."""
    fd, size = open_regular(name, src_dir, max_bytes)
    try:
        target = dst_name or name
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        if overwrite:
            tmp = f".{target}.{os.getpid()}.{threading.get_ident()}.tmp"  # copies may race: each its own
            try:
                os.unlink(tmp, dir_fd=dst_dir)
            except FileNotFoundError:
                pass
            out = os.open(tmp, flags | os.O_EXCL, 0o600, dir_fd=dst_dir)
        else:
            out = os.open(target, flags | os.O_EXCL, 0o600, dir_fd=dst_dir)
        try:
            n = copy_fd(fd, out, size)
            if uid is not None:
                os.fchown(out, uid, uid)
            if fsync:
                os.fsync(out)
        finally:
            os.close(out)
        if overwrite:
            os.rename(tmp, target, src_dir_fd=dst_dir, dst_dir_fd=dst_dir)
        return n
    finally:
        os.close(fd)


def copy_tree(src: Path, dst: Path, uid: int | None, exclude: Exclude | None = None,
              overlay: bool = False) -> CopyStats:
    """Copy directory `src` to the new directory `dst` (which must not exist), files and
    directories only, every copy owned by `uid` (None: root) with owner-only modes.
    `overlay`: `src` is an overlayfs upper layer: its whiteouts (0/0 character devices: a
    file deleted from the layer below) and opaque directories are kept as such."""
    stats = CopyStats()
    os.mkdir(dst, 0o700)
    src_fd = open_dir(src)
    try:
        dst_fd = open_dir(dst)
        try:
            if uid is not None:
                os.fchown(dst_fd, uid, uid)
            _copy_dir(src_fd, dst_fd, "", uid, exclude, stats, overlay)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    return stats


OPAQUE_XATTR = "trusted.overlay.opaque"


def _copy_dir(src_fd: int, dst_fd: int, rel: str, uid: int | None, exclude: Exclude | None,
              stats: CopyStats, overlay: bool = False) -> None:
    for name in sorted(os.listdir(src_fd)):
        path = f"{rel}{name}"
        try:
            st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed while we walk (a temporary file)
        is_dir = stat.S_ISDIR(st.st_mode)
        if exclude is not None and exclude(path, is_dir):
            continue
        if is_dir:
            try:
                child = open_dir(name, src_fd)
            except FileNotFoundError:
                continue
            except OSError:  # swapped for a symlink (ELOOP) or a non-directory since the stat
                stats.skipped.append(path)
                continue
            try:
                os.mkdir(name, 0o700, dir_fd=dst_fd)
                out = open_dir(name, dst_fd)
                try:
                    if uid is not None:
                        os.fchown(out, uid, uid)
                    if overlay:
                        _copy_opaque(child, out)
                    _copy_dir(child, out, path + "/", uid, exclude, stats, overlay)
                finally:
                    os.close(out)
            finally:
                os.close(child)
        elif stat.S_ISREG(st.st_mode):
            try:
                stats.bytes += copy_file(name, src_fd, dst_fd, uid)
                stats.files += 1
            except FileNotFoundError:
                continue
            except OSError:  # became a symlink, FIFO, ... between stat and open
                stats.skipped.append(path)
        elif overlay and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            os.mknod(name, stat.S_IFCHR | 0o600, 0, dir_fd=dst_fd)  # a whiteout: root made it, root copies it
            if uid is not None:
                os.chown(name, uid, uid, dir_fd=dst_fd, follow_symlinks=False)
        else:
            stats.skipped.append(path)


def _copy_opaque(src_fd: int, dst_fd: int) -> None:
    try:
        value = os.getxattr(src_fd, OPAQUE_XATTR)
    except OSError:
        return
    os.setxattr(dst_fd, OPAQUE_XATTR, value)


def fsync_tree(path: Path) -> None:
    """Make a fresh copy durable: an fsync of every file and directory in it, after all of
    them were written (on XFS the first one commits the journal for all the others; a
    syncfs would also write back every other database's dirty pages on the file system)."""
    fd = open_dir(path)
    try:
        _fsync_dir(fd)
    finally:
        os.close(fd)


def _fsync_dir(dir_fd: int) -> None:
    for name in os.listdir(dir_fd):
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            child = open_dir(name, dir_fd)
            try:
                _fsync_dir(child)
            finally:
                os.close(child)
        elif stat.S_ISREG(st.st_mode):
            fd, _ = open_regular(name, dir_fd)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    os.fsync(dir_fd)


def remove_tree(path: Path) -> None:
    """rm -rf that never follows a symlink out of `path` (shutil.rmtree uses fds where it can)."""
    import shutil

    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
