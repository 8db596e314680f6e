"""Guest images: kernel + read-only root filesystem + template data disk, cached by content.

Cache layout (default /var/cache/pgfleet, env PGFLEET_CACHE; never inside a checkout):
    kernels/<kernel-key>/vmlinux           PVH ELF, shared by every image built from the same kernel inputs
    images/<name>-<image-key>/             rootfs.img, data.img, image.json
An image is rebuilt only when one of its inputs changes: the kernel config fragment, the
linux-source package version, the postgres version, the guest init and guest configs.
Builds happen in a temporary directory renamed into place, so a failed build leaves nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from pgfleet.drivers.base import DriverError

from .common import GUEST_DIR, Progress, cache_dir, content_hash, no_progress
from . import kernel as kernel_mod
from . import rootfs as rootfs_mod

IMAGE_FORMAT = "pgfleet-microvm-image-v2"
DEFAULT_IMAGE = "postgres:15"
# Each database's disk: sparse, so the size is a ceiling, not a cost (a fresh cluster uses
# ~30 MB; ext4 metadata for 8 GiB adds ~3 MB over 2 GiB).
DATA_DISK_MB = 8192


@dataclass(frozen=True)
class Image:
    name: str
    key: str
    dir: Path
    kernel: Path
    rootfs: Path
    rootfs_type: str
    data: Path
    kernel_source: str
    postgres_version: str
    built_at: float
    kernel_bytes: int
    rootfs_bytes: int

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("dir", "kernel", "rootfs", "data"):
            d[k] = str(d[k])
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Image":
        d = dict(d)
        for k in ("dir", "kernel", "rootfs", "data"):
            d[k] = Path(d[k])
        return cls(**d)

    def cmdline(self) -> str:
        """Kernel command line: fast, quiet boot; network configured by the kernel (ip=)."""
        return " ".join([
            "console=ttyS0", "quiet", "loglevel=1", "reboot=t", "panic=-1", "no_timer_check",
            "tsc=reliable", "i8042.noaux", "i8042.nokbd", "i8042.nopnp", "i8042.dumbkbd",
            "cryptomgr.notests", "random.trust_cpu=on", "8250.nr_uarts=1",
            "rcupdate.rcu_expedited=1", "mitigations=off",
            *os.environ.get("PGFLEET_GUEST_CMDLINE_EXTRA", "").split(),
            "root=/dev/vda", f"rootfstype={self.rootfs_type}", "ro", "init=/sbin/init",
            # EROFS would also cache the compressed blocks it reads, next to the decompressed
            # pages: ~7 MB more guest memory per VM, measured. The host's page cache of the
            # (shared) root image serves a re-read.
            *(["rootflags=cache_strategy=disabled"] if self.rootfs_type == "erofs" else []),
            "ip=10.0.0.2::10.0.0.1:255.255.255.252:pgfleet:eth0:off",
        ])


def _pg_major(name: str) -> str:
    if not name.startswith("postgres:"):
        raise DriverError(f"unknown image {name!r}: images are named postgres:<major>")
    major = name.split(":", 1)[1]
    if major != rootfs_mod.PG_MAJOR:
        raise DriverError(
            f"image {name!r}: only postgres:{rootfs_mod.PG_MAJOR} is installed on this host"
        )
    return major


def image_key(name: str) -> str:
    """Content hash of everything an image is made from."""
    guest_files = sorted(p for p in GUEST_DIR.iterdir() if p.is_file())
    return content_hash([
        IMAGE_FORMAT, name, _kernel_key_or_fallback(), rootfs_mod.postgres_version(),
        Path(rootfs_mod.__file__).read_bytes(),  # how the root fs is made is an input too
        f"data-disk-mb={DATA_DISK_MB}",
        *[p.name.encode() + b"\0" + p.read_bytes() for p in guest_files],
    ])


def _kernel_key_or_fallback() -> str:
    override = os.environ.get("PGFLEET_GUEST_KERNEL")
    if override:
        st = Path(override).stat()
        return f"override:{override}:{st.st_size}:{int(st.st_mtime)}"
    return kernel_mod.kernel_key()


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """One build at a time per cache (two daemons or a CLI and a daemon may race)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _image_dir(cache: Path, name: str, key: str) -> Path:
    return cache / "images" / f"{name.replace(':', '-')}-{key}"


def find_image(name: str = DEFAULT_IMAGE, cache: Path | None = None) -> Image | None:
    """The cached image for the current inputs, or None if it must be (re)built."""
    cache = cache or cache_dir()
    _pg_major(name)
    meta = _image_dir(cache, name, image_key(name)) / "image.json"
    if not meta.exists():
        return None
    return Image.from_json(json.loads(meta.read_text()))


def list_images(cache: Path | None = None) -> list[Image]:
    cache = cache or cache_dir()
    out = []
    for meta in sorted((cache / "images").glob("*/image.json")):
        try:
            out.append(Image.from_json(json.loads(meta.read_text())))
        except (ValueError, TypeError, KeyError):
            continue  # a foreign or older-format entry: ignore rather than fail the listing
    return out


def build_image(
    name: str = DEFAULT_IMAGE,
    cache: Path | None = None,
    progress: Progress = no_progress,
    force: bool = False,
) -> Image:
    """Return the image for `name`, building whatever part is missing or outdated.

    Cached: a second call with unchanged inputs returns at once. The kernel build takes a
    few minutes on 2 cores; progress(stage, fraction, message) reports along the way.
    """
    cache = cache or cache_dir()
    _pg_major(name)
    with _locked(cache):
        key = image_key(name)
        final = _image_dir(cache, name, key)
        if (final / "image.json").exists():
            if not force:
                progress("done", 1.0, f"{name} is cached ({key})")
                return Image.from_json(json.loads((final / "image.json").read_text()))
            users = live_users(final)
            if users:
                # A suspended guest's page cache belongs to these exact image bytes.
                raise DriverError(f"image {name} ({key}) is in use by {len(users)} instance(s); "
                                  "it cannot be rebuilt in place")
        kernel, kernel_source = _ensure_kernel(cache, progress)
        (cache / "images").mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache / "images"))
        try:
            sub = _sub(progress, 0.85, 0.95)
            rootfs_type = rootfs_mod.build_rootfs(tmp / "rootfs.img", sub)
            rootfs_mod.build_data_disk(tmp / "data.img", DATA_DISK_MB, _sub(progress, 0.95, 0.99))
            image = Image(
                name=name, key=key, dir=final, kernel=kernel, rootfs=final / "rootfs.img",
                rootfs_type=rootfs_type, data=final / "data.img", kernel_source=kernel_source,
                postgres_version=rootfs_mod.postgres_version(), built_at=time.time(),
                kernel_bytes=kernel.stat().st_size,
                rootfs_bytes=(tmp / "rootfs.img").stat().st_size,
            )
            os.chmod(tmp, 0o755)  # mkdtemp made it private; VMs may run as other users later
            (tmp / "image.json").write_text(json.dumps(image.to_json(), indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        progress("done", 1.0, f"built {name} ({key})")
        return image


def _sub(progress: Progress, lo: float, hi: float) -> Progress:
    return lambda stage, f, msg: progress(stage, lo + (hi - lo) * f, msg)


def _ensure_kernel(cache: Path, progress: Progress) -> tuple[Path, str]:
    override = os.environ.get("PGFLEET_GUEST_KERNEL")
    if override:
        # Escape hatch for hosts that cannot build a kernel (no linux-source, no compiler):
        # any bzImage or PVH vmlinux with the options in guest/kernel.config built in.
        progress("kernel", 0.85, f"using PGFLEET_GUEST_KERNEL={override} (not built here)")
        return Path(override), f"override {override}"
    key = kernel_mod.kernel_key()
    kdir = cache / "kernels" / key
    kernel = kdir / "vmlinux"
    if kernel.exists():
        progress("kernel", 0.85, f"kernel {key} is cached")
    else:
        (cache / "kernels").mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache / "kernels"))
        try:
            kernel_mod.build_kernel(tmp, _sub(progress, 0.0, 0.85))
            if kdir.exists():
                shutil.rmtree(kdir)
            os.rename(tmp, kdir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return kernel, kernel_mod.source_version(kernel_mod.linux_source_tarball())


# ---------------------------------------------------------------- users and pruning
#
# A suspended instance's snapshot holds the guest's page cache of *its* root image, so it can
# only be resumed with that very image; and a copy-on-write data disk reads through to *its*
# template's data image. Images and templates in use are recorded (one small file per
# instance under <image or template dir>/users/) and never pruned.


def register_user(owner_dir: Path, uuid: str, home: Path) -> None:
    users = owner_dir / "users"
    users.mkdir(exist_ok=True)
    (users / uuid).write_text(str(home) + "\n")


def unregister_user(owner_dir: Path, uuid: str) -> None:
    try:
        (owner_dir / "users" / uuid).unlink()
    except FileNotFoundError:
        pass


def live_users(owner_dir: Path) -> list[str]:
    live = []
    for ref in (owner_dir / "users").glob("*"):
        try:
            if Path(ref.read_text().strip()).exists():
                live.append(ref.name)
        except OSError:
            continue
    return live


def prune_images(cache: Path | None = None, dry_run: bool = False) -> list[Path]:
    """Remove images that are neither current nor used by an instance, templates of
    non-current images no instance's disk reads through to, and kernels no remaining image uses. Returns what was (or would be)
    removed."""
    cache = cache or cache_dir()
    removed: list[Path] = []
    with _locked(cache):
        current = {}
        for img in list_images(cache):
            if img.name not in current:
                try:
                    cur = find_image(img.name, cache)
                except DriverError:
                    cur = None
                current[img.name] = cur.key if cur else None
        keep_kernels: set[Path] = set()
        keep_images: set[str] = set()
        for img in list_images(cache):
            if img.key == current.get(img.name) or live_users(img.dir):
                keep_kernels.add(img.kernel.parent)
                keep_images.add(img.key)
            else:
                removed.append(img.dir)
        for meta in (cache / "templates").glob("*/template.json"):
            try:
                info = json.loads(meta.read_text())
            except ValueError:
                continue
            # Other drivers keep templates here too: only ours carry an image key and accel.
            if not {"image", "accel", "memory_mb"} <= info.keys():
                continue
            if info["image"] not in current.values() and not live_users(meta.parent):
                removed.append(meta.parent)
        for kdir in (cache / "kernels").glob("*"):
            if kdir.is_dir() and not kdir.name.startswith(".") and kdir not in keep_kernels:
                removed.append(kdir)
        if not dry_run:
            for path in removed:
                shutil.rmtree(path, ignore_errors=True)
    return removed
