"""Finding the PostgreSQL server binaries Debian installs (/usr/lib/postgresql/<major>/bin)."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .base import DriverUnavailable

DEBIAN_ROOT = Path("/usr/lib/postgresql")


@dataclass(frozen=True)
class PostgresInstall:
    major: int
    bindir: Path
    version: str  # e.g. "15.18 (Debian 15.18-0+deb12u1)"

    @property
    def postgres(self) -> Path:
        return self.bindir / "postgres"

    @property
    def initdb(self) -> Path:
        return self.bindir / "initdb"


@lru_cache(maxsize=None)
def find_postgres(major: int | None = None) -> PostgresInstall:
    """The requested major version, or the newest one installed."""
    candidates = sorted(
        (int(p.name) for p in DEBIAN_ROOT.glob("*") if p.name.isdigit() and (p / "bin/postgres").exists()),
        reverse=True,
    )
    if major is not None:
        candidates = [c for c in candidates if c == major]
    if not candidates:
        wanted = f"PostgreSQL {major}" if major else "PostgreSQL"
        raise DriverUnavailable(
            f"{wanted} server binaries not found under {DEBIAN_ROOT} (run `make deps` or apt-get install postgresql)"
        )
    bindir = DEBIAN_ROOT / str(candidates[0]) / "bin"
    out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=True)
    m = re.search(r"\(PostgreSQL\) (.+)$", out.stdout.strip())
    return PostgresInstall(candidates[0], bindir, m.group(1) if m else out.stdout.strip())

