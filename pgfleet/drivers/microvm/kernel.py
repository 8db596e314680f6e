"""Build the guest kernel from Debian's `linux-source` package: tinyconfig + guest/kernel.config.

The result is an XZ-compressed `bzImage` (~1.7 MB) that QEMU's microvm machine boots directly
with the Linux boot protocol (no firmware). An uncompressed PVH `vmlinux` would boot ~0.4 s
faster under TCG but is ~16 MB (9 MB loaded); cold boots are rare here (templates are made
once, instances resume from snapshots), so the small kernel wins.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

from pgfleet.drivers.base import DriverError

from .common import GUEST_DIR, Progress, content_hash, no_progress, run

FRAGMENT = GUEST_DIR / "kernel.config"


def linux_source_tarball() -> Path:
    """Debian ships the source as /usr/src/linux-source-X.Y.tar.xz; take the newest."""
    found = sorted(glob.glob("/usr/src/linux-source-*.tar.xz"))
    if not found:
        raise DriverError(
            "no /usr/src/linux-source-*.tar.xz: install the Debian package `linux-source`"
        )
    return Path(found[-1])


def source_version(tarball: Path) -> str:
    """Package version (e.g. 6.1.192-2): changes with every Debian update of the source."""
    pkg = tarball.name.removesuffix(".tar.xz")
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True
        )
        if out.returncode == 0 and out.stdout:
            return f"{pkg}={out.stdout}"
    except FileNotFoundError:
        pass
    st = tarball.stat()
    return f"{pkg}:{st.st_size}:{int(st.st_mtime)}"


def kernel_key() -> str:
    tarball = linux_source_tarball()
    return content_hash(["kernel-v1", source_version(tarball), FRAGMENT.read_bytes()])


def wanted_options() -> dict[str, str]:
    """CONFIG_X -> 'y' or 'n' as the fragment asks."""
    wanted: dict[str, str] = {}
    for line in FRAGMENT.read_text().splitlines():
        if m := re.fullmatch(r"(CONFIG_\w+)=y", line.strip()):
            wanted[m.group(1)] = "y"
        elif m := re.fullmatch(r"# (CONFIG_\w+) is not set", line.strip()):
            wanted[m.group(1)] = "n"
    return wanted


def build_kernel(out_dir: Path, progress: Progress = no_progress, jobs: int | None = None) -> Path:
    """Build bzImage into out_dir (a fresh directory) and return its path. Takes minutes."""
    tarball = linux_source_tarball()
    work = out_dir / "build"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    progress("kernel", 0.0, f"unpacking {tarball.name}")
    # Only arch/x86 and the generic trees are needed; unpacking all of it is simpler and ~20 s.
    with tarfile.open(tarball) as tar:
        tar.extractall(work, filter="fully_trusted")
    src = next(p for p in work.iterdir() if p.is_dir())
    make = ["make", "-C", str(src), "ARCH=x86_64", f"-j{jobs or os.cpu_count() or 1}"]
    progress("kernel", 0.1, "configuring (tinyconfig + pgfleet options)")
    run(make[:-1] + ["tinyconfig"], "kernel tinyconfig")
    config = src / ".config"
    with config.open("a") as f:
        f.write("\n" + FRAGMENT.read_text())
    run(make[:-1] + ["olddefconfig"], "kernel olddefconfig")
    have = _read_config(config)
    missing = [k for k, v in wanted_options().items() if (have.get(k, "n") == "y") != (v == "y")]
    if missing:
        raise DriverError(f"kernel options did not apply (unmet dependencies?): {missing}")
    progress("kernel", 0.15, "compiling the kernel (a few minutes on 2 cores)")
    proc = subprocess.Popen(
        make + ["bzImage"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # The kernel has ~1100 objects at this config; count compiled objects for a rough fraction.
    done, tail = 0, []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-20:]
        if line.lstrip().startswith("CC"):
            done += 1
            if done % 25 == 0:
                progress("kernel", 0.15 + 0.8 * min(done / 1100, 1.0), f"compiled {done} files")
    if proc.wait() != 0:
        raise DriverError("kernel build failed:\n" + "\n".join(tail))
    bzimage = out_dir / "bzImage"
    shutil.copy2(src / "arch/x86/boot/bzImage", bzimage)
    shutil.copy2(config, out_dir / "config")
    progress("kernel", 0.98, "removing the build tree")
    shutil.rmtree(work)
    return bzimage


def _read_config(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if m := re.fullmatch(r"(CONFIG_\w+)=(.*)", line):
            out[m.group(1)] = m.group(2)
    return out
