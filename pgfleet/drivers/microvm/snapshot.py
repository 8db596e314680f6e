"""Files of a snapshot: sparse-aware copies and atomic replacement.

A snapshot is three files that must match: the RAM file, the data disk and the device state.
Guest RAM and disk images are mostly holes (never-touched memory, unused blocks); copying
only their data extents keeps a clone's disk use at what the guest really used and makes the
copy take milliseconds.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

SEEK_DATA, SEEK_HOLE = os.SEEK_DATA, os.SEEK_HOLE


def copy_sparse(src: Path, dst: Path) -> int:
    """Copy src to dst keeping holes; returns the bytes actually copied.

    Uses copy_file_range (in-kernel, reflinks where the filesystem can), extent by extent
    as SEEK_DATA/SEEK_HOLE report them. dst is written under a temporary name and renamed,
    so a crash never leaves a half-copied file under the final name.
    """
    tmp = dst.with_name(dst.name + ".part")
    copied = 0
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)  # tenant data
    with open(src, "rb") as fin, open(fd, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        os.ftruncate(fout.fileno(), size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fin.fileno(), pos, SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole remains
                    break
                raise
            end = os.lseek(fin.fileno(), start, SEEK_HOLE)
            off_in, off_out, left = start, start, end - start
            while left > 0:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), left, off_in, off_out)
                if n == 0:
                    raise OSError(f"short copy of {src} at {off_in}")
                off_in += n
                off_out += n
                left -= n
                copied += n
            pos = end
    os.rename(tmp, dst)
    return copied


def allocated_bytes(path: Path) -> int:
    """Disk space a (sparse) file really uses."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def unlink_quiet(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------- durability across host crashes
#
# A suspend must be fast, so it does not fsync the RAM file (tens of MB in the page cache).
# The data disk is written with O_DIRECT and is always durable. If the host crashes before
# the page cache reaches the disk, RAM file and disk no longer match: restoring would run a
# guest whose memory disagrees with its filesystem. So each snapshot carries a marker: the
# host's boot id when it was written, replaced by "synced" once a background fsync of all
# snapshot files finished. A snapshot is used only if it is synced or from this very boot;
# otherwise the disk alone is the truth (a cold boot, Postgres crash recovery).

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
SYNCED = "synced"


def boot_id() -> str:
    return BOOT_ID.read_text().strip()


def marker_path(state: Path) -> Path:
    return state.with_name(state.name + ".durable")


def mark_unsynced(state: Path) -> str:
    """Mark a snapshot as not yet durable; returns its token for sync_snapshot()."""
    token = os.urandom(8).hex()
    marker_path(state).write_text(f"{boot_id()} {token}\n")
    return token


def snapshot_usable(state: Path) -> bool:
    if not state.exists():
        return False
    try:
        mark = marker_path(state).read_text().split()
    except FileNotFoundError:
        return False
    return bool(mark) and (mark[0] == SYNCED or mark[0] == boot_id())


def sync_snapshot(state: Path, others: list[Path], token: str) -> None:
    """fsync every snapshot file, then mark the snapshot durable (runs on a worker thread).

    Harmless if the instance resumes meanwhile: the marker is only upgraded while it still
    names this snapshot's token.
    """
    try:
        for path in [*others, state]:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        current = marker_path(state).read_text().split()
    except FileNotFoundError:
        return  # resumed or destroyed meanwhile: nothing left to vouch for
    if current[1:] == [token] and state.exists():
        tmp = marker_path(state).with_name(marker_path(state).name + ".tmp")
        tmp.write_text(f"{SYNCED} {token}\n")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.rename(tmp, marker_path(state))
        dfd = os.open(state.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def drop_snapshot(state: Path) -> None:
    unlink_quiet(state)
    unlink_quiet(marker_path(state))
