"""Connection URIs: the one builder the API, the operator and the node agent share."""

from __future__ import annotations

from urllib.parse import quote


def connection_uri(role: str, password: str | None, hostport: str, database: str) -> str:
    """postgresql://role[:password]@host:port/database, with the credentials percent-encoded."""
    cred = quote(role, safe="") + (f":{quote(password, safe='')}" if password else "")
    return f"postgresql://{cred}@{hostport}/{database}"


def connection_uris(role: str, password: str | None, direct: str, pooled: str, database: str) -> dict[str, str]:
    """The database's `uri` (direct listener) and `pooled_uri` (pooled listener)."""
    return {"uri": connection_uri(role, password, direct, database),
            "pooled_uri": connection_uri(role, password, pooled, database)}
