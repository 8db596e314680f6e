"""Saving a new database's password where libpq looks for it (~/.pgpass or $PGPASSFILE),
so the password is shown once, stored nowhere on the server, yet `psql URI` just works."""

from __future__ import annotations

import os
from pathlib import Path


def pgpass_path() -> Path:
    return Path(os.environ.get("PGPASSFILE") or Path.home() / ".pgpass")


def _escape(field: str) -> str:
    return field.replace("\\", "\\\\").replace(":", "\\:")


def _key(host: str, port: int, database: str, user: str) -> str:
    return ":".join(_escape(f) for f in (host, str(port), database, user)) + ":"


def save(entries: list[tuple[str, int, str, str]], password: str | None) -> Path:
    """Replace the lines for each (host, port, database, user); add them with `password`."""
    path = pgpass_path()
    keys = {_key(*e) for e in entries}
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if not any(line.startswith(k) for k in keys)]
    if password is not None:
        kept += [k + _escape(password) for k in sorted(keys)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(line + "\n" for line in kept))
    os.chmod(path, 0o600)
    return path
