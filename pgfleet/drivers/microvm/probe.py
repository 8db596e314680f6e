"""Does KVM really run a guest here? Decided by booting one, not by looking at /dev/kvm.

Some hosts expose a /dev/kvm that cannot run a stock guest (e.g. PVM, which only runs kernels
built for it: QEMU then stops with "KVM internal error"). The probe boots the guest kernel
with no root device under `-accel kvm`: a working KVM reaches the kernel's "no root" panic and
reboots (QEMU -no-reboot exits 0) in well under a second; a broken one hangs or errors.
The verdict is cached per host kernel, QEMU binary and guest kernel, in memory and on disk.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .common import QEMU, cache_dir

_verdict: dict[str, bool] = {}


def _probe_kernel() -> Path | None:
    """A directly bootable kernel: the newest guest kernel built into the cache, else the
    host's own (/boot/vmlinuz-*; any x86 kernel reaches its "no root" panic on microvm)."""
    found = sorted((p for name in ("vmlinux", "bzImage")
                    for p in glob.glob(str(cache_dir() / "kernels" / "*" / name))),
                   key=os.path.getmtime)
    if not found:
        found = [p for p in sorted(glob.glob("/boot/vmlinuz-*"), key=os.path.getmtime)
                 if os.access(p, os.R_OK)]
    return Path(found[-1]) if found else None


def _key(kernel: Path) -> str:
    qemu = shutil.which(QEMU) or ""
    qst = os.stat(qemu) if qemu else None
    return json.dumps([os.uname().release, qemu, qst.st_mtime if qst else 0, str(kernel),
                       kernel.stat().st_mtime])


def kvm_works(timeout: float = 15.0) -> bool:
    """True only if a guest kernel actually ran under -accel kvm on this host."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or shutil.which(QEMU) is None:
        return False
    kernel = _probe_kernel()
    if kernel is None:
        return False  # no guest kernel built yet: nothing to boot; do not cache this
    key = _key(kernel)
    if key in _verdict:
        return _verdict[key]
    cache_file = cache_dir() / "kvm-probe.json"
    try:
        saved = json.loads(cache_file.read_text())
        if saved.get("key") == key:
            _verdict[key] = bool(saved["works"])
            return _verdict[key]
    except (FileNotFoundError, ValueError, KeyError):
        pass
    works = _boot_probe(kernel, timeout)
    _verdict[key] = works
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps({"key": key, "works": works}))
    except OSError:
        pass  # a read-only cache only costs a re-probe next time
    return works


def _boot_probe(kernel: Path, timeout: float, accel: str = "kvm") -> bool:
    with tempfile.TemporaryDirectory(prefix="pgfleet-kvm-probe-") as tmp:
        console = Path(tmp) / "console"
        argv = [
            # ACPI on: a distribution kernel may need it to find its devices on microvm.
            QEMU, "-M", "microvm,x-option-roms=off", "-accel", accel,
            "-cpu", "host" if accel == "kvm" else "max",
            "-m", "64M", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-kernel", str(kernel),
            "-append", "console=ttyS0 reboot=t panic=-1 root=/dev/nonexistent",
            "-serial", f"file:{console}",
        ]
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False  # e.g. "KVM internal error": QEMU pauses the guest and waits forever
        text = console.read_text(errors="replace") if console.exists() else ""
        return proc.returncode == 0 and "Kernel panic" in text
