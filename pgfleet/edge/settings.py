"""The HTTP/WebSocket listener's limits: one place for each, set from `pgfleet up`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MiB = 1 << 20


@dataclass(frozen=True)
class EdgeSettings:
    #: request body of POST /sql, and one WebSocket message (Neon's default: 10 MiB)
    max_request_bytes: int = 10 * MiB
    #: the database's answer to one POST /sql (wire bytes; Neon's default: 10 MiB)
    max_response_bytes: int = 10 * MiB
    #: open HTTP and WebSocket connections, authenticated or not: with the limits above, what
    #: bounds the memory hostile clients can make the daemon hold
    max_connections: int = 512
    #: a connection without a whole request by then (or idle that long between requests) is closed
    idle_timeout_s: float = 30.0
    #: one POST /sql from its headers to its answer (reading the body, waking, the queries)
    request_timeout_s: float = 60.0
    #: a WebSocket whose path names neither /direct nor /pooled gets this kind of session
    ws_session: Literal["direct", "pooled"] = "direct"
    #: cached successful password checks (each costs a PBKDF2 of the verifier's iterations)
    password_cache: int = 4096
    #: queries in one batch
    max_batch: int = 1000
