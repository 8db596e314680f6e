"""The `Neon-Connection-String` header: postgres[ql]://user:password@host[:port]/database[?options=...]."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

MAX_LENGTH = 4096


class BadConnectionString(ValueError):
    pass


@dataclass(frozen=True)
class ConnectionString:
    user: str
    password: str | None
    host: str
    database: str
    options: str | None

    def __repr__(self) -> str:  # never the password in a log line or a traceback
        return f"ConnectionString(user={self.user!r}, host={self.host!r}, database={self.database!r})"


def parse(text: str) -> ConnectionString:
    if len(text) > MAX_LENGTH:
        raise BadConnectionString(f"the connection string is longer than {MAX_LENGTH} characters")
    try:
        parts = urlsplit(text.strip())
        host = parts.hostname or ""
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as exc:
        raise BadConnectionString(f"invalid connection string: {exc}") from None
    if parts.scheme not in ("postgres", "postgresql"):
        raise BadConnectionString("the connection string must start with postgres:// or postgresql://")
    user = unquote(parts.username or "")
    if not user:
        raise BadConnectionString("the connection string names no user")
    password = unquote(parts.password) if parts.password is not None else None
    database = unquote(parts.path.lstrip("/")) or user
    options = parse_qs(parts.query, keep_blank_values=True).get("options", [None])[-1] if parts.query else None
    for value in (user, database, password or "", options or ""):
        if "\0" in value:
            raise BadConnectionString("the connection string holds a NUL character")
    return ConnectionString(user, password, host, database, options)
