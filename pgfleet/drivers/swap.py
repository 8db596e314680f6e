"""Swap for the warm tier, set up only when asked (`pgfleet up --swap SIZE`).

A swap file under the pgfleet home, and zswap (compressed swap cache in RAM: a frozen
database's pages come back in about a millisecond instead of a disk read) where the kernel
has the module. Everything changed is remembered and put back by `undo()`.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ZSWAP_ENABLED = Path("/sys/module/zswap/parameters/enabled")
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'512M', '2G', '2GiB', '1048576' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not match:
        raise ValueError(f"invalid size {text!r}: expected a number with an optional K, M, G or T suffix")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def total_bytes() -> int:
    """Swap the host has enabled (0 without: the warm tier then freezes without reclaim)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("SwapTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def active_swaps() -> list[str]:
    try:
        lines = Path("/proc/swaps").read_text().splitlines()[1:]
    except OSError:
        return []
    return [line.split()[0] for line in lines if line.strip()]


def zswap_enabled() -> bool | None:
    """True/False, or None where the kernel has no zswap."""
    try:
        return ZSWAP_ENABLED.read_text().strip() in ("Y", "1")
    except OSError:
        return None


@dataclass
class SwapSetup:
    """What `enable` changed on the host, so it can be put back."""

    file: Path | None = None  # a swap file we created and enabled
    zswap_turned_on: bool = False

    def describe(self) -> str:
        parts = []
        if self.file is not None:
            parts.append(f"swap file {self.file}")
        if self.zswap_turned_on:
            parts.append("zswap enabled")
        return ", ".join(parts) or "nothing changed"

    def undo(self) -> None:
        if self.file is not None:
            if str(self.file) in active_swaps():
                _run("swapoff", str(self.file))
            self.file.unlink(missing_ok=True)
            self.file = None
        if self.zswap_turned_on:
            try:
                ZSWAP_ENABLED.write_text("N")
            except OSError as exc:
                log.warning("could not turn zswap back off: %s", exc)
            self.zswap_turned_on = False


def enable(path: Path, size_bytes: int, zswap: bool = True) -> SwapSetup:
    """Create and enable a swap file of `size_bytes` at `path` (root only), and zswap."""
    if size_bytes < 40 << 10:
        raise ValueError("a swap file needs at least 40 KiB")
    setup = SwapSetup()
    try:
        if str(path) not in active_swaps():
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                try:
                    os.posix_fallocate(fd, 0, size_bytes)
                except OSError:  # file systems without fallocate: write it out
                    chunk = b"\0" * (1 << 20)
                    for _ in range(0, size_bytes, len(chunk)):
                        os.write(fd, chunk)
            finally:
                os.close(fd)
            setup.file = path
            _run("mkswap", str(path))
            _run("swapon", str(path))
        if zswap and zswap_enabled() is False:
            ZSWAP_ENABLED.write_text("Y")
            setup.zswap_turned_on = True
    except BaseException:
        setup.undo()
        raise
    log.info("swap for the warm tier: %s", setup.describe())
    return setup


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise OSError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.returncode}")
