"""A client of the pooled listener after authentication: a server connection is bound to
it only for a transaction.

PooledClient is assembled from its parts, which share its state (client_state.py):
client_walk.py (its messages to the server), server_walk.py (the answers to it),
statement_mapping.py (named prepared statements across server connections) and
session_params.py (its session parameters on every server connection). This module
holds its lifecycle: the one attach path, the one transaction-done path, release, close.

Messages stream through in both directions: the proxy reads only headers and the few
messages it rewrites or must understand (Parse/Bind/Describe/Close with statement names,
DEALLOCATE/DISCARD, ReadyForQuery, ParameterStatus, ErrorResponse, its own queries'
answers); every other message is forwarded as its bytes arrive, however large it is.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable

from pgfleet.pgwire import messages as m
from pgfleet.pgwire.framing import Framer

from .client_state import ClientPhase
from .client_walk import ClientWalk
from .expect import PROXY_KINDS, Expect
from .params import ParamSet
from .pool import Pool, ServerConn
from .server_walk import ServerWalk
from .session_params import ParamFollowing
from .statement_mapping import StatementMapping
from .statements import ClientStatements


#: bound for the per-transaction paths (an enum attribute lookup costs ~6x a global's)
_IDLE = ClientPhase.IDLE
_ATTACHED = ClientPhase.ATTACHED
_CLOSING = ClientPhase.CLOSING


class PooledClient(ClientWalk, ServerWalk, StatementMapping, ParamFollowing, asyncio.Protocol):
    """One client of the pooled listener, after authentication."""

    def __init__(self, pool: Pool, transport: asyncio.Transport, on_busy: Callable[[bool], None],
                 pset: ParamSet | None = None) -> None:
        # the state its parts share (what each attribute means: ClientState)
        self.pool = pool
        self.transport: asyncio.Transport | None = transport
        self.on_busy = on_busy
        self.busy = False
        self.server: ServerConn | None = None
        self.pset = pset if pset is not None else pool.registry.base
        self.phase = ClientPhase.IDLE
        self.acquiring: asyncio.Task | None = None
        self.queue: deque[Expect] = deque()
        self.statements = ClientStatements(pool.texts)
        self.in_tx = False
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._out: list[bytes] = []
        self._backlog = bytearray()
        self._cframe = Framer()
        self._unsynced = False
        self._sframe = Framer()
        self._ready = False
        self._dirty: set[str] | None = None
        self._proxy_error: bytes | None = None
        self._unsure = False
        # its lifecycle's own
        self.wait_since = 0.0  # monotonic time it began to wait for a server connection, else 0
        #: after a final error mid-message: resolves once the rest was dropped and the connection closed
        self.lingering: asyncio.Future | None = None
        self._discard: _Discard | None = None
        transport.set_protocol(self)

    def start(self, leftover: bytes = b"") -> None:
        if leftover:
            self.data_received(leftover)
        if self.transport is not None:
            self.transport.resume_reading()

    def _busy(self, busy: bool) -> None:
        if busy != self.busy:
            self.busy = busy
            self.on_busy(busy)

    def acquire_async(self) -> None:
        """A connection that may have to be opened (and the database woken) first."""
        self.phase = ClientPhase.ACQUIRING
        self.acquiring = asyncio.ensure_future(self.pool.acquire())
        self.acquiring.add_done_callback(self._acquired)

    def _acquired(self, task: asyncio.Task) -> None:
        self.acquiring = None
        self._waited()
        if task.cancelled():
            return
        if task.exception() is not None:
            self._busy(False)
            self._fatal("08006", f"could not get a server connection: {task.exception()}")
            return
        self.granted(task.result())

    def granted(self, conn: ServerConn) -> None:
        """A server connection for the messages that arrived while there was none."""
        self._waited()
        if self.done.done():
            self.pool.release(conn)
            return
        if self.transport is not None:
            self.transport.resume_reading()
        self._attach(conn)
        data = bytes(self._backlog)
        self._backlog.clear()
        self._from_client(data)

    def _waited(self) -> None:
        if self.wait_since:
            self.pool.wait_seconds += time.monotonic() - self.wait_since
            self.wait_since = 0.0

    def _attach(self, conn: ServerConn) -> None:
        """The one way a server connection becomes this client's, on every path (an idle
        one at hand, a granted or a newly opened one)."""
        if not self.busy:
            self.busy = True
            self.on_busy(True)
        conn.client = self
        self.server = conn
        self.phase = _ATTACHED
        if conn.pset is not self.pset:  # the only per-transaction cost of session parameters
            self._sync_params(conn)

    def _transaction_done(self) -> None:
        """After a ReadyForQuery (on both the fast and the walking path): with no answer
        pending, no transaction open and the client between messages, the server connection
        goes back to the pool, once the values of parameters it does not report are known."""
        if (not self.queue and not self.in_tx and not self._cframe.skip and not self._unsynced
                and self.server is not None):
            if self._dirty:
                self._probe()
            else:
                self._release_server()

    def _release_server(self) -> None:
        self.pool.transactions += 1
        if self.phase is _CLOSING:  # the client is gone (and no longer busy)
            self._drop_server(discard=self._unsure)
            return
        if self._unsure:
            self._drop_server(discard=True)
        else:  # the common case, inline: it runs once per transaction
            server, self.server = self.server, None
            self.phase = _IDLE
            self.pool.release(server)  # type: ignore[arg-type]
        if self.busy:
            self.busy = False
            self.on_busy(False)

    def _drop_server(self, discard: bool) -> None:
        server, self.server = self.server, None
        self._unsure = False
        if self.phase is _ATTACHED:
            self.phase = _IDLE
        elif self.phase is _CLOSING:
            self.phase = ClientPhase.CLOSED
        if server is None:
            return
        if discard:
            self.pool.discard(server)
        else:
            self.pool.release(server)

    def server_lost(self) -> None:
        self.server = None
        self._fatal("08006", "the database connection was lost")

    def pause_writing(self) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._discard is not None:
            self._discard.connection_lost(exc)
            return
        self.transport = None
        self.close()

    def eof_received(self) -> bool | None:
        if self._discard is not None:
            return self._discard.eof_received()
        return None

    def _fatal(self, sqlstate: str, text: str) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(m.error_response(sqlstate, text))
            if not self._cframe.between or sqlstate == "54000":
                # the client is still sending a message: close after the error, discarding
                # the rest (closing with it unread would reset the connection, error and all)
                self._discard = _Discard(transport)
                self.lingering = self._discard.closed
                self.transport = None
                self.close()
                self._discard.start()
                return
        self.close()

    def close(self) -> None:
        if self.done.done():
            return
        if self.acquiring is not None:
            self.acquiring.cancel()
        self.phase = ClientPhase.CLOSED  # a pool that queued it skips it
        if self.server is not None:
            if (self.queue and not self.in_tx and not self._cframe.skip and not self._unsynced
                    and all(e.kind in PROXY_KINDS for e in self.queue)):
                # only the proxy's own queries are pending: let them finish, then release
                self.phase = ClientPhase.CLOSING
            else:
                # mid-transaction or with answers pending, its state is unknown: do not reuse it
                self._drop_server(discard=bool(self.queue or self.in_tx or self._cframe.skip or self._unsynced
                                               or self._dirty or self._unsure))
        self._busy(False)
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        self.statements.clear()  # gives their memory back to the budget
        cf = self._cframe
        if cf.whole is not None:
            self.pool.guards.memory.give(cf.whole_len)
            cf.whole = None
        self.done.set_result(None)

    def cancel_target(self) -> tuple[int, int] | None:
        if self.phase is not _ATTACHED or self.server is None:
            return None
        return self.server.process_id, self.server.secret_key


class _Discard:
    """A client connection after its final error: what it still sends is read and dropped
    (bounded in bytes and time) while the error and our FIN reach it."""

    LINGER_S = 2.0
    LINGER_BYTES = 64 << 20

    def __init__(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        self.transport = transport
        self.left = self.LINGER_BYTES
        self.timer = loop.call_later(self.LINGER_S, transport.close)
        self.closed: asyncio.Future = loop.create_future()

    def start(self) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.left -= len(data)
        if self.left < 0:
            self.transport.close()

    def eof_received(self) -> bool:
        self.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        if not self.closed.done():
            self.closed.set_result(None)
