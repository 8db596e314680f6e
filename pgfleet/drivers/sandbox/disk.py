"""disk_mb: a database's own filesystem, so that its size limit is the filesystem's.

The host's filesystem has no project quotas (ext4 without `prjquota`), so a database with a
disk limit gets a sparse ext4 image of exactly disk_mb, loop-mounted (nosuid, nodev) at its
data directory on the host and kept mounted while the daemon runs (standby costs no process;
a wake pays no mount). Over the limit Postgres gets ENOSPC, which it reports as 53100
(disk_full); reads go on; growing the image (online resize2fs) heals it. An overlayfs upper
directory (engineer "density") can live on the same filesystem.

pg_wal lives on a second, fixed-size filesystem of its own (WAL_IMAGE_MB, a symlink from the
data directory): when the data filesystem is full, Postgres must still be able to write WAL (a
WAL write that fails is a PANIC, and crash recovery on a full disk would keep the database
down). WAL is bounded by max_wal_size; if a tenant fills that filesystem on purpose, only its
own database suffers.

Per database, creating costs sparse copies of template images (made once per template with
`mkfs.ext4 -d`) and a grow; no mkfs on the create path.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from ..base import DriverError

TEMPLATE_IMAGE_MB = 64  # holds a fresh cluster (~30 MB) with room; each database grows its copy
WAL_IMAGE_MB = 256  # 4 x max_wal_size (template.py): a checkpoint always finds room
IMAGE_NAME = "data.img"
WAL_IMAGE_NAME = "wal.img"


async def _run(*argv: str, ok: tuple[int, ...] = (0,)) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    text = out.decode(errors="replace").strip()
    if proc.returncode not in ok:
        raise DriverError(f"{argv[0]} failed: {text[-300:]}")
    return text


async def _template_image(final: Path, size_mb: int, content: Path | None) -> Path:
    """An ext4 image of `size_mb` holding `content` (a directory) at its root; made once."""
    if final.exists():
        return final
    tmp = final.with_name(f".{final.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    with open(tmp, "wb") as f:
        f.truncate(size_mb << 20)
    # lazy init: the image stays sparse; a small journal keeps it consistent across a host crash
    await _run("mkfs.ext4", "-q", "-F", "-m", "0", "-b", "4096", "-J", "size=4",
               "-E", "lazy_itable_init=1,lazy_journal_init=1",
               *(["-d", str(content)] if content is not None else []), str(tmp))
    tmp.rename(final)
    return final


def wal_dir(home: Path) -> Path:
    return home / "wal"


async def make_images(template: Path, home: Path, size_mb: int) -> None:
    """The database's data image (`size_mb`, holding the template cluster) and WAL image."""
    data_tpl = await _template_image(template.with_name(template.name + ".img"), TEMPLATE_IMAGE_MB, template)
    wal_tpl = await _template_image(template.with_name(f"empty-{WAL_IMAGE_MB}m.img"), WAL_IMAGE_MB, None)
    if not (home / WAL_IMAGE_NAME).exists():
        partial = home / f"{WAL_IMAGE_NAME}.partial"
        await _run("cp", "--sparse=always", str(wal_tpl), str(partial))
        partial.rename(home / WAL_IMAGE_NAME)
    if not image_of(home).exists():
        await make_image(data_tpl, home, size_mb)


async def ensure_mounted_all(home: Path, data: Path) -> None:
    await ensure_mounted(image_of(home), data)
    await ensure_mounted(home / WAL_IMAGE_NAME, wal_dir(home))


async def unmount_all(home: Path, data: Path) -> None:
    await unmount(data)
    await unmount(wal_dir(home))


async def move_wal(data: Path, wal: Path) -> None:
    """Move the template's WAL onto the WAL filesystem; pg_wal becomes a symlink to it (an
    absolute path, which the jail binds at the same place)."""
    pg_wal = data / "pg_wal"
    if pg_wal.is_symlink():
        return
    for entry in pg_wal.iterdir():  # (lost+found of each filesystem stays where it is: fsck wants it)
        shutil.move(str(entry), str(wal / entry.name))
    pg_wal.rmdir()
    pg_wal.symlink_to(os.path.realpath(wal))


def image_of(home: Path) -> Path:
    return home / IMAGE_NAME


async def make_image(template_image: Path, home: Path, size_mb: int) -> Path:
    """The database's own image, `size_mb` large, holding the template cluster."""
    if size_mb < TEMPLATE_IMAGE_MB:
        raise DriverError(f"disk_mb must be at least {TEMPLATE_IMAGE_MB}")
    final = image_of(home)
    partial = home / f"{IMAGE_NAME}.partial"
    await _run("cp", "--sparse=always", str(template_image), str(partial))
    await grow_offline(partial, size_mb)
    partial.rename(final)
    return final


async def ensure_mounted(image: Path, mountpoint: Path) -> None:
    if os.path.ismount(mountpoint):
        return
    mountpoint.mkdir(mode=0o700, exist_ok=True)
    await _run("mount", "-o", "loop,nosuid,nodev,noatime", str(image), str(mountpoint))


async def unmount(mountpoint: Path, image: Path | None = None) -> None:
    """Unmount; with `image`, also wait (bounded) until no mount of it is left anywhere (its
    loop device is released), as an offline resize needs."""
    if os.path.ismount(mountpoint):
        # lazy: a namespace still detaching its copy must not fail a delete; the loop device
        # goes when the last reference does (autoclear)
        await _run("umount", "--lazy", str(mountpoint))
    if image is None:
        return
    deadline = asyncio.get_running_loop().time() + 10
    while await _run("losetup", "-j", str(image)):
        if asyncio.get_running_loop().time() > deadline:
            raise DriverError(f"{image} is still in use")
        await asyncio.sleep(0.05)


def _loop_device(mountpoint: Path) -> str:
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                return fields[fields.index("-") + 2]
    raise DriverError(f"{mountpoint} is not mounted")


class NeedsOffline(DriverError):
    """Online growth is refused here (it needs CAP_SYS_RESOURCE, which some hosts' root lacks)."""


async def grow(image: Path, mountpoint: Path, size_mb: int) -> None:
    """Grow the mounted filesystem to `size_mb` online; shrinking is refused. Raises
    NeedsOffline if the kernel refuses an online resize: then unmount and grow_offline()."""
    current = image.stat().st_size >> 20
    if size_mb < current:
        raise DriverError(f"disk_mb can only grow (it is {current})")
    if size_mb == current:
        return
    with open(image, "r+b") as f:
        f.truncate(size_mb << 20)
    device = _loop_device(mountpoint)
    await _run("losetup", "-c", device)
    try:
        await _run("resize2fs", device)
    except DriverError as exc:
        if "Permission denied" in str(exc):
            raise NeedsOffline(str(exc)) from None
        raise


async def grow_offline(image: Path, size_mb: int) -> None:
    """Grow an unmounted image to `size_mb`."""
    with open(image, "r+b") as f:
        if f.seek(0, 2) < size_mb << 20:
            f.truncate(size_mb << 20)
    await _run("e2fsck", "-f", "-p", str(image), ok=(0, 1))  # 1: fixed something harmless
    await _run("resize2fs", str(image))


def remove(home: Path) -> None:
    for p in (image_of(home), home / f"{IMAGE_NAME}.partial"):
        p.unlink(missing_ok=True)
    shutil.rmtree(home / "data", ignore_errors=True)
