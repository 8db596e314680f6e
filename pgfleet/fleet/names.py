"""Database names: DNS labels (they become hostnames for SNI routing and role names)."""

from __future__ import annotations

import re

from .errors import InvalidRequest

_LABEL = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
RESERVED = frozenset({"postgres", "template0", "template1", "pgfleet", "admin"})


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _LABEL.match(name):
        raise InvalidRequest(
            f"invalid database name {name!r}: use 1-63 lower-case letters, digits and '-', "
            "starting with a letter and not ending with '-'"
        )
    if name in RESERVED:
        raise InvalidRequest(f"database name {name!r} is reserved")
    return name
