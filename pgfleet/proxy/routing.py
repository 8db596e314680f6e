"""Where a client connection goes: which database it asks for (TLS SNI `<db>.<domain>`,
Neon-style `options=endpoint=<db>`, or the database name) and where it came from."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Origin:
    """How a connection reached the proxy when not on its own socket: tunnelled through
    another listener (pgfleet.edge's WebSocket), which terminated TLS and saw the host name."""

    tls: bool = False
    sni: str | None = None  # the host name the client asked for (TLS SNI or the tunnel's)
    #: a client that sent its password ahead of the request (the Neon driver's
    #: pipelineConnect) is asked for it in cleartext; otherwise SCRAM as usual
    cleartext_ok: bool = False
    #: the client's address as the tunnel saw it (pre-auth caps and login backoff count by
    #: it); None: each tunnelled connection is a source of its own
    peer: str | None = None


@dataclass
class Route:
    name: str
    how: Literal["sni", "endpoint", "database"]
    options: str | None  # the options parameter with routing words removed


def route(options: str | None, database: str, sni: str | None, domain: str) -> Route:
    """Which database a client wants: by SNI (`<db>.<domain>`), then `options=endpoint=<db>`,
    then the database name. `domain` is lower case without dots at its ends."""
    endpoint, rest = take_endpoint(options)
    if sni:
        sni = sni.lower().rstrip(".")
        suffix = "." + domain
        if sni.endswith(suffix) and "." not in sni[: -len(suffix)]:
            return Route(sni[: -len(suffix)], "sni", rest)
    if endpoint:
        return Route(endpoint, "endpoint", rest)
    return Route(database, "database", options)


def server_name(writer: asyncio.StreamWriter, origin: Origin | None) -> str | None:
    """The host name the client asked for: its tunnel's, or its TLS SNI."""
    if origin is not None:
        return origin.sni
    ssl_obj = writer.get_extra_info("ssl_object")
    return getattr(ssl_obj, "pgfleet_sni", None) if ssl_obj is not None else None


def take_endpoint(options: str | None) -> tuple[str | None, str | None]:
    """Neon-style `options=endpoint=<name>` (alone or among other words)."""
    if not options:
        return None, options
    words = options.split()
    endpoint = None
    kept = []
    for w in words:
        if w.startswith("endpoint="):
            endpoint = w.split("=", 1)[1]
        else:
            kept.append(w)
    return endpoint, (" ".join(kept) if kept else None)


def source_address(writer: asyncio.StreamWriter, origin: Origin | None = None) -> str:
    """The client's address (no port): what pre-auth caps and login backoff count by."""
    if origin is not None:
        return origin.peer or f"tunnel-{id(writer):x}"
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "local"
