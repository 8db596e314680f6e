"""The state of one pooled client, shared by the parts of PooledClient (pooled_client.py):
the client-to-server walker (client_walk.py), the server-to-client walker (server_walk.py),
the named-statement mapping (statements.py) and the session parameters it follows
(session_params.py). The walkers are the hot path of transaction pooling: they read and
write this state as plain attributes of one object, with no call between the parts per
message.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from typing import TYPE_CHECKING, Callable

from pgfleet.pgwire.framing import Framer

from .expect import Expect
from .params import ParamSet
from .statements import ClientStatements

if TYPE_CHECKING:
    from .pool import Pool, ServerConn


class ClientPhase(enum.Enum):
    """Where a pooled client is with server connections: one state where there were flags
    (waiting, closing, a task acquiring)."""

    IDLE = "idle"  # no server connection, none asked for
    ACQUIRING = "acquiring"  # one is being opened (its database woken) for it: `acquiring`
    WAITING = "waiting"  # queued in the pool for the next released connection
    ATTACHED = "attached"  # holds `server` for the current transaction
    CLOSING = "closing"  # the client is gone; the proxy's own queries finish on `server`
    CLOSED = "closed"


class ClientState:
    """What a pooled client holds (set up by PooledClient.__init__)."""

    pool: Pool
    transport: asyncio.Transport | None
    on_busy: Callable[[bool], None]
    busy: bool
    server: ServerConn | None  # the server connection bound for the current transaction
    pset: ParamSet  # the session parameters the client wants
    phase: ClientPhase
    acquiring: asyncio.Task | None  # the task opening a server connection for it (ACQUIRING)
    queue: deque[Expect]  # the answers expected from the server, in order
    statements: ClientStatements  # client statement name -> server name, Parse rest, SETs
    in_tx: bool
    done: asyncio.Future
    _out: list[bytes]  # to the server, flushed once per read
    _backlog: bytearray  # what arrived while no server connection was bound
    _cframe: Framer  # client -> server: what a read leaves over (`whole` charged to the budget)
    # extended-protocol messages were sent since the last Sync: until the next one the
    # server may hold an implicit transaction or skip everything after an error
    _unsynced: bool
    _sframe: Framer  # server -> client: what a read leaves over (a message passing, or dropped)
    _ready: bool  # a ReadyForQuery was handled in this read
    _dirty: set[str] | None  # parameters the server does not report that the client may have changed
    _proxy_error: bytes | None  # the first error answering the proxy's own query
    _unsure: bool  # the server connection's parameters are unknown: it is not reused
