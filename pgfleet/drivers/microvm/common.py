"""Shared small pieces of the microvm driver: cache location, progress reporting, commands."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Callable, Iterable

from pgfleet.drivers.base import DriverError

#: progress(stage, fraction 0..1 within the whole build, human message)
Progress = Callable[[str, float, str], None]

GUEST_DIR = Path(__file__).with_name("guest")
QEMU = "qemu-system-x86_64"

# Fixed addressing inside every instance's own network namespace: identical for all VMs, so a
# template clone needs no address change and nothing routes between tenants.
HOST_ADDR = "10.0.0.1"
GUEST_ADDR = "10.0.0.2"
NETMASK = "255.255.255.252"
GUEST_MAC = "52:54:00:00:00:02"
CONTROL_PORT = 7  # the guest init's root-only control port (time, entropy, halt)
PG_PORT = 5432


def no_progress(stage: str, fraction: float, message: str) -> None:
    pass


def cache_dir() -> Path:
    """Where images, kernels and templates live: outside any checkout, shared by all users."""
    return Path(os.environ.get("PGFLEET_CACHE", "/var/cache/pgfleet"))


def content_hash(parts: Iterable[bytes | str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: no ambiguous joins
        h.update(data)
    return h.hexdigest()[:16]


def run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    """Run a build step; on failure raise DriverError with the tail of its output."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    except FileNotFoundError as exc:
        raise DriverError(f"{what}: {cmd[0]} is not installed") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise DriverError(f"{what} failed (exit {proc.returncode}): " + "\n".join(tail))
    return proc
