"""Copy-on-write data disks: an empty qcow2 overlay over a template's raw data image.

A database's disk is a qcow2 file whose backing file is its template's data image (read-only,
shared by every database made from that template): a fresh database owns only the clusters
it has written. The overlay is written here, in Python, rather than by `qemu-img create`:
it is four clusters of fixed layout, costs no subprocess on the create path and needs no
qemu-utils on the host. QEMU validates the header when it opens the disk.

The header names the backing file, but QEMU is never left to open it: the tenant's QEMU
holds the overlay read-write and could rename it to any file root can read. pgfleet records
the template image in the instance's home (vmm.record_backing) and hands QEMU the whole
chain (vmm.data_disk_args).

Layout (64 KiB clusters, qcow2 version 3, 16-bit refcounts):
  cluster 0  header, the backing-format extension ("raw"), the backing file's path
  cluster 1  refcount table (one entry: cluster 2)
  cluster 2  refcount block (clusters 0-3 used once)
  cluster 3  L1 table (all zero: every read falls through to the backing file)
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

MAGIC = b"QFI\xfb"
CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
REFCOUNT_ORDER = 4  # 16-bit refcounts, QEMU's default
HEADER_V3_LENGTH = 104
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_END = 0
BACKING_NAME_LIMIT = 4096  # PATH_MAX: no real backing file name is longer


def write_overlay(path: Path, backing: Path, size: int) -> None:
    """An empty qcow2 at `path` of `size` bytes reading through to the raw image `backing`
    (an absolute path: QEMU resolves relative ones against the overlay's directory). Written
    under a temporary name and renamed: a crash never leaves a torn header in place."""
    backing_name = str(backing.absolute()).encode()
    fmt = b"raw"
    ext = struct.pack(">II", EXT_BACKING_FORMAT, len(fmt)) + fmt.ljust(_pad8(len(fmt)), b"\0")
    ext += struct.pack(">II", EXT_END, 0)
    backing_offset = HEADER_V3_LENGTH + len(ext)
    if backing_offset + len(backing_name) > CLUSTER:
        raise ValueError(f"backing file path too long for a qcow2 header: {backing}")
    l2_entries = CLUSTER // 8
    l1_size = -(-size // (CLUSTER * l2_entries))
    if l1_size * 8 > CLUSTER:
        raise ValueError(f"disk of {size} bytes needs more than one L1 cluster")
    refcount_table, refcount_block, l1_table = CLUSTER, 2 * CLUSTER, 3 * CLUSTER
    header = MAGIC + struct.pack(
        ">IQIIQIIQQIIQQQQII",
        3,  # version
        backing_offset, len(backing_name),
        CLUSTER_BITS, size,
        0,  # no encryption
        l1_size, l1_table,
        refcount_table, 1,  # one refcount table cluster
        0, 0,  # no internal snapshots
        0, 0, 0,  # incompatible, compatible, autoclear features: none
        REFCOUNT_ORDER, HEADER_V3_LENGTH,
    )
    assert len(header) == HEADER_V3_LENGTH
    tmp = path.with_name(path.name + ".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)  # tenant data
    try:
        os.pwrite(fd, header + ext + backing_name, 0)
        os.pwrite(fd, struct.pack(">Q", refcount_block), refcount_table)
        os.pwrite(fd, struct.pack(">4H", 1, 1, 1, 1), refcount_block)
        os.ftruncate(fd, l1_table + CLUSTER)  # the L1 table: zeros, a hole on disk
    finally:
        os.close(fd)
    os.rename(tmp, path)


def backing_file(path: Path) -> Path | None:
    """The backing file a qcow2 image names in its header (None: it has none). Only for
    looking at: the header is the tenant's (QEMU holds the disk read-write), so nothing
    uses this name to open a file (vmm.recorded_backing is the template image), and a name
    longer than BACKING_NAME_LIMIT is refused rather than read."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        head = os.pread(fd, 20, 0)
        if len(head) < 20 or head[:4] != MAGIC:
            raise ValueError(f"{path} is not a qcow2 image")
        offset, length = struct.unpack(">QI", head[8:20])
        if offset == 0:
            return None
        if length > BACKING_NAME_LIMIT:
            raise ValueError(f"{path} names a backing file of {length} bytes "
                             f"(more than {BACKING_NAME_LIMIT})")
        name = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(name) != length:
        raise ValueError(f"{path} is truncated inside its backing file name")
    return Path(name.decode(errors="replace"))


def _pad8(n: int) -> int:
    return (n + 7) & ~7
