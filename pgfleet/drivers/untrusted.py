"""Reading files a tenant controls (anything in a data directory, logs it writes) as root,
without trusting them: a FIFO must not block the daemon, a symlink must not lead it to
/dev/zero or another file, and a huge file must not fill its memory."""

from __future__ import annotations

import os
import stat
from pathlib import Path

PIDFILE_LIMIT = 4096  # postmaster.pid is ~100 bytes
LOG_TAIL_LIMIT = 64 * 1024


def _open_regular(path: Path) -> int | None:
    """A read descriptor for `path` if it is a regular file (not through a symlink), else None.
    O_NONBLOCK: opening a FIFO without a writer returns at once (and fstat then refuses it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:  # absent, a symlink (ELOOP), a socket (ENXIO), no permission...
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def read_head(path: Path, limit: int = PIDFILE_LIMIT) -> bytes | None:
    """At most `limit` bytes from the start of a regular file; None if it is not one."""
    fd = _open_regular(path)
    if fd is None:
        return None
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def read_tail(path: Path, limit: int = LOG_TAIL_LIMIT) -> bytes | None:
    """At most the last `limit` bytes of a regular file; None if it is not one."""
    fd = _open_regular(path)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, limit, max(0, size - limit))
    finally:
        os.close(fd)


def rotate_log(path: Path, limit: int) -> bool:
    """A log the tenant writes through an O_APPEND descriptor (the file is root's, in the home):
    once over `limit`, its last `limit` bytes become `<path>.1` and it starts again from zero
    (the writer's next append lands at the new end). Returns whether it rotated."""
    try:
        if os.stat(path, follow_symlinks=False).st_size <= limit:
            return False
    except FileNotFoundError:
        return False
    tail = read_tail(path, limit) or b""
    old = path.with_name(path.name + ".1")
    tmp = path.with_name(path.name + ".1.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, tail)
    finally:
        os.close(fd)
    os.replace(tmp, old)
    os.truncate(path, 0)
    return True


def write_root_file(path: Path, text: str) -> None:
    """A small root-owned 0600 file in a root-owned directory (an instance's home), replaced
    atomically: readers see the old text or the new, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
