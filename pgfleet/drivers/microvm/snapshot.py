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
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
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
