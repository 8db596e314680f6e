"""Transaction pooling: a server connection is bound to a client only for a transaction.

Protocol-level named prepared statements keep working across server connections (as
PgBouncer 1.21+ does): each client's statements are remembered by name; each server
connection remembers which statements it has prepared, under names derived from their
text, and a statement is (re)prepared on whichever server connection a client lands on.
Responses the client did not ask for are dropped, and responses for work the proxy
skipped (a Parse the server already had, a Close it keeps) are synthesised in order.

Session parameters follow each client (params.py): a server connection whose values differ
from the client's gets one simple Query of SETs ahead of the client's messages.

Messages stream through in both directions: the proxy reads only headers and the few
messages it rewrites or must understand (Parse/Bind/Describe/Close with statement names,
DEALLOCATE/DISCARD, ReadyForQuery, ParameterStatus, ErrorResponse, its own queries'
answers); every other message is forwarded as its bytes arrive, however large it is.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import struct
import time
from collections import deque
from typing import Callable

from pgfleet.drivers.base import Backend
from pgfleet.pgwire import messages as m
from pgfleet.pgwire.framing import MAX_MESSAGE_LENGTH, Framer
from pgfleet.pgwire.protocol import BackendMsg, FrontendMsg, Target, TransactionStatus, byte

from . import params as pm
from .connect import BackendRefused, open_session
from .guards import ProxyGuards
from .params import ParamRegistry, ParamSet
from .statements import ClientStatements, SharedTexts, server_statement_name

log = logging.getLogger(__name__)

class Answer(enum.IntEnum):
    """How the proxy treats the server's answer to one request (an Expect's kind). Code
    never relies on their order: `Expect.own` says whether a request is the proxy's own."""

    FWD = 0  # forwarded to the client
    DROP = 1  # dropped: a Parse the proxy sent to re-prepare a statement the client thinks exists
    SYNTH = 2  # no request was sent: the proxy writes the answer (payload) itself, in order
    SYNC = 3  # forwarded, ends with ReadyForQuery (Query, Sync, FunctionCall)
    PSYNC = 4  # the proxy's own Query setting session parameters: dropped up to its ReadyForQuery
    PROBE = 5  # the proxy's own Query asking parameter values: read, dropped up to its ReadyForQuery


FWD, DROP, SYNTH, SYNC, PSYNC, PROBE = Answer  # bound names for the walkers
#: the proxy's own queries: nothing of their answers reaches the client
OWN_QUERIES = frozenset({Answer.PSYNC, Answer.PROBE})
#: server messages that may come at any time, whatever was asked
_ASYNC = frozenset({BackendMsg.NOTICE_RESPONSE, BackendMsg.PARAMETER_STATUS, BackendMsg.NOTIFICATION_RESPONSE})
#: the answers that end an Execute
_EXEC_END = frozenset({BackendMsg.COMMAND_COMPLETE, BackendMsg.EMPTY_QUERY_RESPONSE, BackendMsg.PORTAL_SUSPENDED})
PARSE_COMPLETE = m.message(BackendMsg.PARSE_COMPLETE)
CLOSE_COMPLETE = m.message(BackendMsg.CLOSE_COMPLETE)
#: the types the hot loops test, bound as plain ints (an enum attribute lookup costs ~6x a global's)
_QUERY = int(FrontendMsg.QUERY)
_PARSE = int(FrontendMsg.PARSE)
_SYNC_MSG = int(FrontendMsg.SYNC)
_READY = int(BackendMsg.READY_FOR_QUERY)
_PARAMETER_STATUS = int(BackendMsg.PARAMETER_STATUS)
_ERROR = int(BackendMsg.ERROR_RESPONSE)
_IDLE = int(TransactionStatus.IDLE)
#: the third byte of the SQL "SELECT" (upper or lower case): a Query starting "s?l" is not SET
_SELECT_THIRD = b"lL"
_STATEMENT = byte(Target.STATEMENT)
_IDLE_STATUS = byte(TransactionStatus.IDLE)
#: how much of a message's body the proxy reads to decide how to pass it on
PEEK = 256
#: DEALLOCATE / DISCARD statements longer than this are not looked at
SMALL_SQL = 4096
#: how long the proxy waits for a database that is starting (or recovering) to accept a connection
CONNECT_TIMEOUT_S = 60.0


class Expect:
    """The answer the proxy expects next from the server, and what to do with it."""

    __slots__ = ("kind", "own", "ends", "payload", "on_error")

    def __init__(self, kind: Answer, ends: frozenset[int] = frozenset(), payload=b"",
                 on_error: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self.own = kind in OWN_QUERIES
        self.ends = ends
        self.payload = payload
        self.on_error = on_error


class ServerRefused(Exception):
    """The server answered a request of the proxy's with an ErrorResponse."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(fields.get("M", "the server refused"))
        self.fields = fields


class AnswerTooLarge(Exception):
    """The server's answer to an exchange went over its byte limit."""


class ServerConn(asyncio.Protocol):
    """One pooled connection to a database's Postgres."""

    def __init__(self, pool: "Pool") -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.client: "PooledClient | None" = None
        self.prepared: set[str] = set()
        self.pset: ParamSet = pool.registry.base  # its current session parameters
        self.process_id = 0
        self.secret_key = 0
        self.closed = False
        self._exchange: tuple[Framer, list, list, asyncio.Future] | None = None

    def data_received(self, data: bytes) -> None:
        if self.client is not None:
            self.pool.bytes_sent += len(data)
            self.client.from_server(data)
        elif self._exchange is not None:
            self._exchange_data(data)
        else:  # an idle connection should say nothing but notices; anything else is suspect
            log.debug("idle pooled server connection sent %d bytes", len(data))

    async def exchange(self, payload: bytes, readies: int, max_bytes: int = 0) -> list[tuple[int, bytes]]:
        """Send the proxy's own queries on an idle connection no client holds; their
        answers up to the `readies`-th ReadyForQuery. Past `max_bytes` of answers (if set)
        it raises AnswerTooLarge, and the connection must be discarded."""
        fut = asyncio.get_running_loop().create_future()
        self._exchange = (Framer(m.MAX_READ_WHOLE), [], [readies, max_bytes or -1], fut)
        try:
            self.transport.write(payload)  # type: ignore[union-attr]
            return await fut
        finally:
            self._exchange = None

    def _exchange_data(self, data: bytes) -> None:
        buf, got, left, fut = self._exchange  # type: ignore[misc]
        if fut.done():
            return
        if left[1] >= 0:
            left[1] -= len(data)
            if left[1] < 0:
                fut.set_exception(AnswerTooLarge("the answer is larger than the limit"))
                return
        try:
            msgs = buf.messages(data)
        except m.ProtocolError as exc:
            fut.set_exception(exc)
            return
        for kind, body in msgs:
            got.append((kind, body))
            if kind == BackendMsg.READY_FOR_QUERY:
                left[0] -= 1
                if not left[0]:
                    fut.set_result(got)
                    return

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self._exchange is not None and not self._exchange[3].done():
            self._exchange[3].set_exception(ConnectionError("the database connection was lost"))
        if self.client is not None:
            self.client.server_lost()

    def pause_writing(self) -> None:
        if self.client is not None and self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None and self.client.transport is not None:
            self.client.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Server connections to one database, shared by all its pooled clients."""

    def __init__(self, name: str, role: str, size: int, backend_fn: Callable[[], "asyncio.Future[Backend]"],
                 guards: ProxyGuards | None = None):
        self.guards = guards if guards is not None else ProxyGuards()
        self.max_read_whole = self.guards.limits.max_read_whole
        self.texts = SharedTexts(self.guards.memory)  # named statements' texts, once per pool
        self.name = name
        self.role = role
        self.size = size
        self.backend_fn = backend_fn  # wakes the database if needed
        self.idle: deque[ServerConn] = deque()
        self.conns: set[ServerConn] = set()
        self.waiters: deque[asyncio.Future] = deque()
        self.params: dict[str, str] = {}  # every parameter the server reports, as it reported them
        self.registry = ParamRegistry()
        self.syncs = 0  # parameter Queries sent ahead of a client's messages (stats, tests)
        self._opening = 0
        self.queued: deque[PooledClient] = deque()  # clients waiting for a released connection
        # counted in plain ints on the way, read on a metrics scrape (PgBouncer's SHOW STATS)
        self.bytes_received = 0  # from clients
        self.bytes_sent = 0  # to clients
        self.queries = 0  # ReadyForQuery messages passed to clients
        self.transactions = 0  # server connections released after a transaction
        self.wait_seconds = 0.0  # clients' time waiting for a server connection

    def try_acquire(self) -> ServerConn | None:
        """An idle connection at once, or None (the per-transaction fast path: no task)."""
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        return None

    async def acquire(self) -> ServerConn:
        conn = self.try_acquire()
        if conn is not None:
            return conn
        if len(self.conns) + self._opening < self.size:
            return await self._open()
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut in self.waiters:
                self.waiters.remove(fut)
            if fut.done() and not fut.cancelled():
                self.release(fut.result())
            raise

    async def _open(self) -> ServerConn:
        self._opening += 1
        try:
            backend = await self.backend_fn()
            try:
                reader, writer, replies = await open_session(
                    backend, {"user": self.role, "database": backend.database}, CONNECT_TIMEOUT_S)
            except BackendRefused as exc:
                raise ConnectionError(str(exc))
            conn = ServerConn(self)
            status: dict[str, str] = {}
            try:
                for kind, body in replies:
                    if kind == BackendMsg.PARAMETER_STATUS:
                        name, value, _ = body.split(b"\0", 2)
                        status[name.decode()] = value.decode("utf-8", "surrogateescape")
                    elif kind == BackendMsg.BACKEND_KEY_DATA:
                        conn.process_id, conn.secret_key = struct.unpack("!ii", body[:8])
            except (ValueError, struct.error) as exc:
                writer.close()
                raise ConnectionError(f"the database broke the protocol at startup: {exc}")
            self.params.update(status)
            conn.pset = self.registry.learn(status)
            conn.writer = writer  # a collected StreamWriter closes its transport
            conn.transport = writer.transport  # type: ignore[assignment]
            conn.transport.set_protocol(conn)
            conn.transport.resume_reading()
            self.conns.add(conn)
            return conn
        finally:
            self._opening -= 1

    async def client_params(self, requested: dict[str, str]) -> ParamSet:
        """What a new client with these startup parameters (canonical names) wants. New
        combinations are set on a server connection, which validates them (ServerRefused)
        and canonicalises their values; known ones cost nothing."""
        reg = self.registry
        app = _clean_application_name(requested.get("application_name"), self.params.get("server_version", ""))
        if app is not None:  # known without asking: clients naming each connection cost no round trip
            rest = {k: v for k, v in requested.items() if k != "application_name"}
            return reg.with_values(await self.client_params(rest), {"application_name": app})
        if not requested:
            return reg.base
        key = frozenset(requested.items())
        pset = reg.validated(key)
        if pset is not None:
            return pset
        conn = await self.acquire()
        payload, readies = pm.validation_queries(requested, conn.pset.values.get("client_encoding"))
        try:
            replies = await conn.exchange(payload, readies)
        except BaseException:
            self.discard(conn)
            raise
        error: dict[str, str] | None = None
        values: list[str | None] | None = None
        for kind, body in replies:
            if kind == BackendMsg.ERROR_RESPONSE and error is None:
                error = m.parse_error_fields(body)
            elif kind == BackendMsg.DATA_ROW:  # the last one: the first of two queries only switched the encoding
                try:
                    values = pm.decode_hex_row(body)
                except ValueError:
                    values = None
        if readies > 1:  # its client_encoding was switched: not worth restoring
            self.discard(conn)
        if error is not None:
            if readies == 1:  # the failed query changed nothing
                self.release(conn)
            raise ServerRefused(error)
        if values is None or len(values) != len(requested) or None in values:
            if readies == 1:
                self.discard(conn)
            raise ConnectionError("unexpected answer to the session parameters")
        canonical: dict[str, str | None] = dict(zip(requested, values))
        if readies == 1:
            conn.pset = reg.with_values(conn.pset, canonical)
            self.release(conn)
        pset = reg.with_values(reg.base, canonical)
        reg.remember(key, pset)
        return pset

    def startup_status(self, pset: ParamSet) -> dict[str, str]:
        """The ParameterStatus a client gets at startup: the server's, with its own values."""
        reg = self.registry
        return {**self.params, **{k: v for k, v in pset.values.items() if reg.is_reported(k)}}

    def can_open(self) -> bool:
        return len(self.conns) + self._opening < self.size

    def wait(self, client: "PooledClient") -> None:
        """Queue a client for the next released connection: handed over by a plain call
        (no task or future per transaction while clients outnumber the pool)."""
        self.queued.append(client)

    def release(self, conn: ServerConn) -> None:
        conn.client = None
        if conn.closed:
            self.forget(conn)
            return
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        while self.queued:
            client = self.queued.popleft()
            if client.waiting:
                client.granted(conn)
                return
        self.idle.append(conn)

    def discard(self, conn: ServerConn) -> None:
        conn.client = None
        conn.close()
        self.forget(conn)

    def forget(self, conn: ServerConn) -> None:
        self.conns.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        # a waiter may now get a fresh connection instead of one that will never come back
        if self.waiters and len(self.conns) + self._opening < self.size:
            fut = self.waiters.popleft()
            task = asyncio.ensure_future(self._open())
            task.add_done_callback(lambda t: _resolve(fut, t))
        while self.queued and len(self.conns) + self._opening < self.size:
            client = self.queued.popleft()
            if client.waiting:
                client.waiting = False
                client.acquire_async()

    def close(self) -> None:
        for conn in list(self.conns):
            conn.close()
        self.conns.clear()
        self.idle.clear()


def _clean_application_name(value: str | None, server_version: str) -> str | None:
    """The value Postgres 15 and older give application_name: every byte outside printable
    ASCII becomes '?' (pg_clean_ascii), nothing is refused. None where not known that way."""
    if value is None or not server_version[:2].isdigit() or int(server_version[:2]) > 15:
        return None
    raw = value.encode("utf-8", "surrogateescape")
    return "".join(chr(b) if 32 <= b <= 126 else "?" for b in raw)


def _resolve(fut: asyncio.Future, task: asyncio.Task) -> None:
    if fut.done():
        if not task.cancelled() and task.exception() is None:
            task.result().close()
        return
    if task.cancelled():
        fut.cancel()
    elif task.exception() is not None:
        fut.set_exception(task.exception())  # type: ignore[arg-type]
    else:
        fut.set_result(task.result())


class PooledClient(asyncio.Protocol):
    """One client of the pooled listener, after authentication."""

    def __init__(self, pool: Pool, transport: asyncio.Transport, on_busy: Callable[[bool], None],
                 pset: ParamSet | None = None) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = transport
        self.on_busy = on_busy
        self.busy = False
        self.server: ServerConn | None = None
        self.pset = pset if pset is not None else pool.registry.base  # the session parameters it wants
        self.acquiring: asyncio.Task | None = None
        self.waiting = False  # queued in the pool for the next released connection
        self.queue: deque[Expect] = deque()
        # client statement name -> (server name, Parse rest, the parameters it SETs)
        self.statements = ClientStatements(pool.texts)
        self.in_tx = False
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._out: list[bytes] = []  # to the server, flushed once per read
        # client -> server framing
        self._backlog = bytearray()  # what arrived while no server connection was bound
        # what a read leaves over; `whole` is charged to the pool's memory budget while gathered
        self._cframe = Framer()
        # extended-protocol messages were sent since the last Sync: until the next one the
        # server may hold an implicit transaction or skip everything after an error
        self._unsynced = False
        # server -> client framing
        self._sframe = Framer()  # what a read leaves over (a message passing, or dropped)
        self._ready = False  # a ReadyForQuery was handled in this read
        # session parameters the server does not report, which this client may have changed
        self._dirty: set[str] | None = None
        self._proxy_error: bytes | None = None
        self._unsure = False
        self._closing = False  # the client is gone; the proxy's own queries are still answered
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

    # --- client -> server ------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._discard is not None:
            self._discard.data_received(data)
            return
        self.pool.bytes_received += len(data)
        if (data[0] == _QUERY and len(data) == 1 + _from_bytes(data[1:5], "big") and len(data) > 8
                and (data[5] not in _SQL_FIRST or data[7] in _SELECT_THIRD)
                and not (cf := self._cframe).skip and not cf.head and cf.whole is None):
            # the fast path: one whole simple Query with nothing to look at (a SELECT, an
            # UPDATE...), on the bound server connection or on an idle one at hand
            conn = self.server
            if conn is None and self.acquiring is None and not self.waiting and not self._backlog:
                conn = self.pool.try_acquire()
                if conn is not None:
                    if not self.busy:
                        self.busy = True
                        self.on_busy(True)
                    conn.client = self
                    self.server = conn
                    if conn.pset is not self.pset:
                        self._sync_params(conn)
            if conn is not None:
                self.queue.append(_EXP_QUERY)
                conn.transport.write(data)  # type: ignore[union-attr]
                return
        if self.server is not None:
            self._from_client(data)
            return
        if self.acquiring is not None or self.waiting or self._backlog:
            self._backlog += data
            return
        if data[0] == FrontendMsg.TERMINATE and self._cframe.between:  # Terminate while idle
            self.close()
            return
        if not self.busy:
            self.busy = True
            self.on_busy(True)
        conn = self.pool.try_acquire()
        if conn is not None:  # the per-transaction fast path: an idle connection, no task
            conn.client = self
            self.server = conn
            if conn.pset is not self.pset:  # the only per-transaction cost of session parameters
                self._sync_params(conn)
            if not self._cframe.between:
                self._from_client(data)
            else:
                self._walk_client(data)
                self._flush()
            return
        self._backlog += data
        self.transport.pause_reading()  # type: ignore[union-attr]
        self.wait_since = time.monotonic()
        if self.pool.can_open():
            self.acquire_async()
        else:  # every connection is in use: the next one released comes here
            self.waiting = True
            self.pool.wait(self)

    def acquire_async(self) -> None:
        """A connection that may have to be opened (and the database woken) first."""
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
        self.waiting = False
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
        conn.client = self
        self.server = conn
        if conn.pset is not self.pset:  # the only per-transaction cost of session parameters
            self._sync_params(conn)

    def _sync_params(self, conn: ServerConn) -> None:
        """Pipelined ahead of the client's messages: one Query whose answers are dropped.
        The connection is taken to have the values at once; if the Query fails, the client
        is told and the connection is not reused."""
        payload, readies = self.pset.sync_from(conn.pset)
        conn.pset = self.pset
        self.pool.syncs += 1
        conn.transport.write(payload)  # type: ignore[union-attr]
        for _ in range(readies):
            self.queue.append(_PSYNC)

    def _from_client(self, data: bytes) -> None:
        cf = self._cframe
        if cf.whole is not None:  # a message the proxy reads whole
            size = cf.whole_len
            buf, data = cf.gather(data)
            if buf is None:
                return
            self.pool.guards.memory.give(size)
            if not self._client_message(buf[0], bytes(memoryview(buf)[5:])):
                return
        else:
            passing, data = cf.resume(data)
            if passing:  # the rest of a message streaming through
                if not data:
                    self.server.transport.write(passing)  # type: ignore[union-attr]
                    return
                self._out.append(passing)
        self._walk_client(data)
        self._flush()

    def _walk_client(self, data: bytes) -> None:
        """Walk the client's messages in place: runs of messages that go out as they came
        are written as slices of what arrived (usually the whole read, uncopied); a message
        that does not end in this read streams on in the next."""
        out = self._out
        queue = self.queue
        pos, run, end = 0, 0, len(data)
        while end - pos >= 5:
            kind = data[pos]
            length = int.from_bytes(data[pos + 1 : pos + 5], "big")
            if length < 4 or length > MAX_MESSAGE_LENGTH:
                out.append(data[run:pos])
                self._flush()
                self._fatal("08P01", f"protocol violation: invalid message length {length}")
                return
            mend = pos + 1 + length
            whole = False
            exp = _PASS_THROUGH.get(kind)
            if kind in _LOOK:  # decided by the start of the body
                if kind == _QUERY:
                    if length == 4 or (end > pos + 7 and (data[pos + 5] not in _SQL_FIRST
                                                          or data[pos + 7] in _SELECT_THIRD)):
                        pass  # the common case (not SET/RESET/DEALLOCATE/DISCARD; SELECT): nothing to look at
                    elif (look := pos + 5 + min(length - 4, PEEK)) > end:
                        break
                    elif _DEALLOCATE_START.match(data, pos + 5, look) and length <= SMALL_SQL:
                        whole = True
                    else:
                        self._note_sql(data, pos + 5, look)
                elif (look := pos + 5 + min(length - 4, PEEK)) > end:
                    break
                elif kind == _PARSE:  # an unnamed statement passes as it is
                    if length > 4 and data[pos + 5] == 0:
                        self._note_sql(data, pos + 6, look)
                        exp = _EXP_PARSE
                    else:
                        whole = True
                else:  # Bind: the statement name may be rewritten, the rest streams
                    p_end = data.find(b"\0", pos + 5, look)
                    s_end = data.find(b"\0", p_end + 1, look) if p_end >= 0 else -1
                    if s_end < 0:
                        whole = True
                    else:
                        exp = _EXP_BIND
                        if s_end > p_end + 1:  # a named statement
                            out.append(data[run:pos])
                            run = pos
                            cname = data[p_end + 1 : s_end]
                            sname = self._server_name(self.server, cname)  # type: ignore[arg-type]
                            if sname != cname:
                                out.append(bytes((kind,)) + (length + len(sname) - len(cname)).to_bytes(4, "big")
                                           + data[pos + 5 : p_end + 1] + sname)
                                run = s_end
            elif exp is _NOT_FAST:  # Describe, Close, Terminate: read whole
                whole = True
            if whole:
                out.append(data[run:pos])
                if length > self.pool.max_read_whole:
                    self._flush()
                    self._fatal("54000", f"{_NAMES.get(kind, 'message')} of {length} bytes is longer than the pooled "
                                f"listener reads ({self.pool.max_read_whole} bytes); use an unnamed statement or "
                                "the direct listener")
                    return
                if mend > end:
                    if not self.pool.guards.memory.take(1 + length):
                        self._flush()
                        self._fatal("54000", "the pooled listener's memory for messages it must read is exhausted; "
                                    "retry shortly")
                        return
                    self._cframe.start_whole(data, pos, mend)
                    return
                if not self._client_message(kind, data[pos + 5 : mend]):
                    return
                pos = run = mend
                continue
            if exp is not None:
                queue.append(exp)
            if kind not in _CLEAN:
                self._unsynced = kind != _SYNC_MSG
            if mend > end:
                self._cframe.skip = mend - end
                pos = end
                break
            pos = mend
        if run < pos:
            out.append(data[run:pos])
        if pos < end:
            self._cframe.head = data[pos:]

    def _client_message(self, kind: int, body: bytes) -> bool:
        """One whole message the proxy reads; False when the session ended."""
        server = self.server
        assert server is not None
        if kind == FrontendMsg.TERMINATE:
            self._flush()
            self.close()
            return False
        if kind != FrontendMsg.QUERY:
            self._unsynced = True
        handler = _HANDLERS.get(kind)
        if handler is not None:
            try:
                handler(self, server, body)
            except _OverBudget as exc:
                self._flush()
                self._fatal("54000", str(exc))
                return False
            except ValueError:
                self._flush()
                self._fatal("08P01", f"protocol violation: malformed {chr(kind)!r} message")
                return False
            return True
        if kind == FrontendMsg.QUERY:  # DEALLOCATE / DISCARD need bookkeeping
            body = self._sql_deallocate(server, body)
        self._out.append(m.message(kind, body))
        exp = _PASS_THROUGH.get(kind)
        if exp is not None and exp is not _NOT_FAST:
            self.queue.append(exp)
        return True

    def _flush(self) -> None:
        out = self._out
        if out:
            if self.server is not None and self.server.transport is not None:
                self.server.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _note_sql(self, data: bytes, start: int, stop: int) -> tuple | str | None:
        """SET/RESET/DISCARD ALL at the start of a statement: the parameters it may change.
        Those the server does not report are asked for when the transaction ends."""
        match = pm.SESSION_SQL.match(data, start, stop)
        if match is None:
            return None
        names = pm.session_sql_names(match)
        self._mark(names)
        return names

    def _mark(self, names: tuple | str | None) -> None:
        if names is None:
            return
        reg = self.pool.registry
        if names == pm.ALL:
            names = tuple(self.pset.values)
        for name in names:
            if not reg.is_reported(name):
                if self._dirty is None:
                    self._dirty = set()
                self._dirty.add(name)

    def _parse(self, server: ServerConn, body: bytes) -> None:
        end = body.index(b"\0")
        name, rest = body[:end], body[end + 1 :]
        sets = self._note_sql(rest, 0, min(len(rest), PEEK))
        if not name:
            self._out.append(m.message(FrontendMsg.PARSE, body))
            self.queue.append(_EXP_PARSE)
            return
        sname = server_statement_name(rest)
        if not self.statements.add(name.decode(errors="replace"), sname, rest, sets):
            raise _OverBudget("the pooled listener's memory for prepared statements is exhausted; "
                              "deallocate statements or use unnamed ones")
        if sname in server.prepared:
            self._synth(PARSE_COMPLETE)
        else:
            self._prepare_on(server, sname, rest, FWD)

    def _prepare_on(self, server: ServerConn, sname: str, rest: bytes, kind: Answer) -> None:
        server.prepared.add(sname)
        self._out.append(m.message(FrontendMsg.PARSE, sname.encode() + b"\0" + rest))
        self.queue.append(Expect(kind, _PARSED, on_error=lambda: server.prepared.discard(sname)))

    def _server_name(self, server: ServerConn, client_name: bytes) -> bytes:
        """Map a client statement name to the server's, preparing it there if needed."""
        if not client_name:
            return client_name
        known = self.statements.get(client_name.decode(errors="replace"))
        if known is None:
            return client_name  # unknown: the server reports 26000 itself
        sname, rest, sets = known
        if sets is not None:
            self._mark(sets)
        if sname not in server.prepared:
            self._prepare_on(server, sname, rest, DROP)
        return sname.encode()

    def _bind(self, server: ServerConn, body: bytes) -> None:
        p_end = body.index(b"\0")
        s_end = body.index(b"\0", p_end + 1)
        sname = self._server_name(server, body[p_end + 1 : s_end])
        self._out.append(m.message(FrontendMsg.BIND, body[: p_end + 1] + sname + body[s_end:]))
        self.queue.append(_EXP_BIND)

    def _describe(self, server: ServerConn, body: bytes) -> None:
        if body[:1] == _STATEMENT:
            sname = self._server_name(server, body[1:-1])
            self._out.append(m.message(FrontendMsg.DESCRIBE, _STATEMENT + sname + b"\0"))
            self.queue.append(_EXP_PARAMS)  # ParameterDescription, then
        else:
            self._out.append(m.message(FrontendMsg.DESCRIBE, body))
        self.queue.append(_EXP_ROWS)  # RowDescription or NoData

    def _close(self, server: ServerConn, body: bytes) -> None:
        if body[:1] == _STATEMENT and body[1:-1]:
            # the server keeps it for the next client that prepares the same statement
            self.statements.pop(body[1:-1].decode(errors="replace"))
            self._synth(CLOSE_COMPLETE)
            return
        self._out.append(m.message(FrontendMsg.CLOSE, body))
        self.queue.append(_EXP_CLOSE)

    def _sql_deallocate(self, server: ServerConn, body: bytes) -> bytes:
        """SQL that drops prepared statements (psycopg sends DEALLOCATE ALL after a DROP or
        ROLLBACK): keep the statement maps true, and translate a client's name to the
        server's."""
        m_ = _DEALLOCATE.match(body)
        if m_ is None:
            return body
        target = m_.group("name")
        if target is None or target.upper() == b"ALL":  # DISCARD ALL or DEALLOCATE ALL
            if target is None:  # DISCARD ALL also resets every session parameter
                self._mark(pm.ALL)
            server.prepared.clear()
            self.statements.clear()
            return body
        known = self.statements.pop(target.strip(b'"').decode(errors="replace"))
        if known is None:
            return body  # not one of ours: the server answers for itself
        server.prepared.discard(known[0])
        return b"DEALLOCATE " + known[0].encode() + b"\0"

    def _synth(self, message: bytes) -> None:
        if not self.queue:
            self.transport.write(message)  # type: ignore[union-attr]
        else:
            self.queue.append(Expect(SYNTH, payload=message))

    # --- server -> client ------------------------------------------------------------
    def from_server(self, data: bytes) -> None:
        queue = self.queue
        sf = self._sframe
        if (len(queue) == 1 and queue[0] is _EXP_QUERY and not sf.skip and not sf.head
                and sf.whole is None and self.transport is not None):
            # the fast path: the answer to one simple Query, whole messages, ReadyForQuery (if
            # it came) last and no ParameterStatus to record; anything else takes the walk
            pos, end, ready = 0, len(data), -1
            while end - pos >= 5:
                kind = data[pos]
                if kind == _READY:
                    ready = pos
                elif kind == _PARAMETER_STATUS:
                    break
                nxt = pos + 1 + _from_bytes(data[pos + 1 : pos + 5], "big")
                if nxt < pos + 5:
                    break
                pos = nxt
            if pos == end and (ready < 0 or ready == end - 6):
                self.transport.write(data)
                if ready >= 0:
                    self.pool.queries += 1
                    queue.popleft()
                    self.in_tx = data[ready + 5] != _IDLE
                    if not self.in_tx and not self._cframe.skip and not self._unsynced and self.server is not None:
                        if self._dirty:
                            self._probe()
                        else:
                            self._release_server()
                return
        out: list[bytes] = []
        if sf.whole is not None:  # a message the proxy reads whole
            buf, data = sf.gather(data)
            if buf is None:
                return
            if not self._walk_server(bytes(buf), out):
                return
        else:
            passing, data = sf.resume(data)
            if passing:  # the rest of a message passing (or dropped) as it arrives
                if not data:
                    if not sf.drop and self.transport is not None:
                        self.transport.write(passing)
                    return
                if not sf.drop:
                    out.append(passing)
        if data and not self._walk_server(data, out):
            return
        if self.transport is not None and out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if self._ready:
            self._ready = False
            if (not self.queue and not self.in_tx and not self._cframe.skip and not self._unsynced
                    and self.server is not None):
                if self._dirty:
                    self._probe()
                else:
                    self._release_server()

    def _walk_server(self, data: bytes, out: list[bytes]) -> bool:
        """Walk the server's messages in place: runs of messages the client should see are
        written as slices of what arrived (usually the whole read, uncopied); a message that
        does not end in this read streams on in the next, unless the proxy must read it.
        False when the session ended."""
        queue = self.queue
        pos, run, end = 0, 0, len(data)
        while end - pos >= 5:
            kind = data[pos]
            mend = pos + 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
            if mend < pos + 5:
                out.append(data[run:pos])
                self._write(out)
                self._fatal("08P01", "the database broke the protocol: message length below 4")
                return False
            if queue:
                head = queue[0]
                hk = head.kind
                own = head.own
            else:
                head, hk, own = None, -1, False
            if own:  # the proxy's own query: nothing reaches the client
                out.append(data[run:pos])
                run = mend
                if kind in _PROXY_READS:
                    if mend > end:
                        return self._gather_server(data, pos, mend, out)
                    if not self._proxy_reply(head, kind, data[pos + 5 : mend], out):
                        return False
                elif mend > end:
                    self._sframe.skip, self._sframe.drop = mend - end, True
                    return True
                pos = mend
                continue
            if mend > end and (kind == _READY or kind == _PARAMETER_STATUS):  # read whole: gather it
                out.append(data[run:pos])
                return self._gather_server(data, pos, mend, out)
            if kind in _ASYNC:
                if kind == _PARAMETER_STATUS:  # the session's parameters changed
                    self._parameter_status(data[pos + 5 : mend])
            else:
                if hk == SYNTH:
                    out.append(data[run:pos])
                    _emit_synth(queue, out)
                    run = pos
                    head = queue[0] if queue else None
                    hk = head.kind if head is not None else -1
                if kind == _ERROR:  # the server now skips to the next Sync
                    while queue and queue[0].kind != SYNC:
                        e = queue.popleft()
                        if e.on_error is not None:
                            e.on_error()
                elif head is not None:
                    if hk == DROP:
                        out.append(data[run:pos])
                        run = mend
                    if kind in head.ends:
                        queue.popleft()
                if kind == _READY:
                    self.pool.queries += 1
                    self.in_tx = data[pos + 5] != _IDLE
                    self._ready = True
                    if queue and queue[0].kind == SYNTH:
                        out.append(data[run:mend])
                        _emit_synth(queue, out)
                        run = mend
            if mend > end:  # the rest streams on in the next reads
                self._sframe.skip = mend - end
                self._sframe.drop = run > pos
                pos = end
                break
            pos = mend
        if run < pos:
            out.append(data[run:pos])
        if pos < end:
            self._sframe.head = data[pos:]
        return True

    def _gather_server(self, data: bytes, pos: int, mend: int, out: list[bytes]) -> bool:
        """Start gathering a server message the proxy reads whole (bounded: the server
        is the tenant's, and a tenant with code execution may answer anything)."""
        if mend - pos > 1 + self.pool.max_read_whole:
            self._write(out)
            self._fatal("08P01", f"the database sent a message of {mend - pos} bytes the proxy must read whole")
            return False
        self._sframe.start_whole(data, pos, mend)
        return True

    def _proxy_reply(self, head: Expect, kind: int, body: bytes, out: list[bytes]) -> bool:
        if kind == BackendMsg.ERROR_RESPONSE:
            if self._proxy_error is None:
                self._proxy_error = body
        elif kind == BackendMsg.DATA_ROW:
            if head.kind == PROBE:
                self._probe_row(head.payload, body)
        else:  # ReadyForQuery
            self.queue.popleft()
            self.in_tx = body[:1] != _IDLE_STATUS
            error, self._proxy_error = self._proxy_error, None
            if error is not None:
                self._unsure = True  # the connection's parameters are unknown: it is not reused
                if head.kind == PSYNC:
                    fields = m.parse_error_fields(error)
                    self._write(out)
                    if self._closing:
                        self._drop_server(discard=True)
                    self._fatal(fields.get("C", "08006"), "could not give a server connection this session's "
                                f"parameters: {fields.get('M', 'error')}")
                    return False
            self._ready = True
            if self.queue and self.queue[0].kind == SYNTH:
                _emit_synth(self.queue, out)
        return True

    def _parameter_status(self, body: bytes) -> None:
        """The server reports a parameter's new value (after the client's SET, or at the end
        of a transaction that SET LOCAL it): the client wants it, the connection has it."""
        parts = body.split(b"\0")
        if len(parts) < 3:
            return
        reg = self.pool.registry
        name = reg.tracked_name(parts[0].decode("utf-8", "surrogateescape"))
        if name is None:
            return
        change = {name: parts[1].decode("utf-8", "surrogateescape")}
        self.pset = reg.with_values(self.pset, change)
        if self.server is not None:
            self.server.pset = reg.with_values(self.server.pset, change)

    def _probe(self) -> None:
        """After a transaction that ran SET/RESET on parameters the server does not report:
        ask their values (ahead of anything the client sends next, on the same connection)."""
        names = sorted(self._dirty or ())
        self._dirty = None
        self.server.transport.write(pm.probe_query(names))  # type: ignore[union-attr]
        self.queue.append(Expect(PROBE, _READY_ENDS, payload=tuple(names)))

    def _probe_row(self, names: tuple[str, ...], body: bytes) -> None:
        try:
            values = pm.decode_hex_row(body)
        except ValueError:
            values = []
        if len(values) != len(names) or any(v is not None and len(v) > pm.MAX_VALUE for v in values):
            self._unsure = True  # the connection's values are unknown: it is not reused
            return
        changes = dict(zip(names, values))
        reg = self.pool.registry
        self.pset = reg.with_values(self.pset, changes)
        if self.server is not None:
            self.server.pset = reg.with_values(self.server.pset, changes)

    def _write(self, out: list[bytes]) -> None:
        if self.transport is not None and out:
            self.transport.write(b"".join(out))
        out.clear()

    def _release_server(self) -> None:
        self.pool.transactions += 1
        if self._unsure:
            self._drop_server(discard=True)
        else:
            server, self.server = self.server, None
            self.pool.release(server)  # type: ignore[arg-type]
        if self.busy and not self._closing:
            self.busy = False
            self.on_busy(False)

    def _drop_server(self, discard: bool) -> None:
        server, self.server = self.server, None
        self._unsure = False
        if server is None:
            return
        if discard:
            self.pool.discard(server)
        else:
            self.pool.release(server)

    def server_lost(self) -> None:
        self.server = None
        self._fatal("08006", "the database connection was lost")

    # --- lifecycle -------------------------------------------------------------------
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
        self.waiting = False  # the pool skips it
        if self.server is not None:
            if (self.queue and not self.in_tx and not self._cframe.skip and not self._unsynced
                    and all(e.kind in _PROXY_KINDS for e in self.queue)):
                # only the proxy's own queries are pending: let them finish, then release
                self._closing = True
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
        if self.server is None or self._closing:
            return None
        return self.server.process_id, self.server.secret_key


# Answers expected for messages forwarded unchanged (shared: expectations are read-only).
_NOT_FAST = Expect(FWD)
_READY_ENDS = frozenset({BackendMsg.READY_FOR_QUERY})
_PARSED = frozenset({BackendMsg.PARSE_COMPLETE})
_PASS_THROUGH: dict[int, Expect | None] = {
    FrontendMsg.QUERY: Expect(SYNC, _READY_ENDS),
    FrontendMsg.SYNC: Expect(SYNC, _READY_ENDS),
    FrontendMsg.FUNCTION_CALL: Expect(SYNC, _READY_ENDS),
    FrontendMsg.EXECUTE: Expect(FWD, _EXEC_END),
    FrontendMsg.FLUSH: None, FrontendMsg.COPY_DATA: None, FrontendMsg.COPY_DONE: None, FrontendMsg.COPY_FAIL: None,
    # read by the proxy
    FrontendMsg.PARSE: _NOT_FAST, FrontendMsg.BIND: _NOT_FAST, FrontendMsg.DESCRIBE: _NOT_FAST,
    FrontendMsg.CLOSE: _NOT_FAST, FrontendMsg.TERMINATE: _NOT_FAST,
}
_EXP_QUERY = _PASS_THROUGH[FrontendMsg.QUERY]
_from_bytes = int.from_bytes
_EXP_PARSE = Expect(FWD, _PARSED)
_EXP_BIND = Expect(FWD, frozenset({BackendMsg.BIND_COMPLETE}))
_EXP_PARAMS = Expect(FWD, frozenset({BackendMsg.PARAMETER_DESCRIPTION}))
_EXP_ROWS = Expect(FWD, frozenset({BackendMsg.ROW_DESCRIPTION, BackendMsg.NO_DATA}))
_EXP_CLOSE = Expect(FWD, frozenset({BackendMsg.CLOSE_COMPLETE}))
_PSYNC = Expect(PSYNC, _READY_ENDS)
_PROXY_KINDS = frozenset({SYNTH, PSYNC, PROBE})
#: messages that leave the server's extended-protocol state as it was: Query, FunctionCall
#: (which answer with ReadyForQuery) and COPY data (which a COPY consumes, or the server ignores)
_CLEAN = frozenset({FrontendMsg.QUERY, FrontendMsg.FUNCTION_CALL, FrontendMsg.COPY_DATA, FrontendMsg.COPY_DONE,
                    FrontendMsg.COPY_FAIL})
#: of the answers to its own queries, what the proxy reads
_PROXY_READS = frozenset({BackendMsg.ERROR_RESPONSE, BackendMsg.DATA_ROW, BackendMsg.READY_FOR_QUERY})
#: messages decided by the start of their body
_LOOK = frozenset({FrontendMsg.QUERY, FrontendMsg.PARSE, FrontendMsg.BIND})
#: first bytes of a Query that may need a look (SET, RESET, DEALLOCATE, DISCARD, whitespace)
_SQL_FIRST = frozenset(b"sSrRdD \t\r\n")
_DEALLOCATE_START = re.compile(rb"\s*(?:deallocate|discard)\b", re.IGNORECASE)

_DEALLOCATE = re.compile(
    rb"^\s*(?:DISCARD\s+ALL|DEALLOCATE\s+(?:PREPARE\s+)?(?P<name>ALL|\"[^\"]+\"|[A-Za-z_][A-Za-z0-9_$]*))\s*;?\s*\x00$",
    re.IGNORECASE,
)


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


class _OverBudget(Exception):
    """Holding what the client asks for would exceed the daemon's memory budget."""


_NAMES = {FrontendMsg.PARSE: "a named Parse message", FrontendMsg.BIND: "a Bind message",
          FrontendMsg.DESCRIBE: "a Describe message", FrontendMsg.CLOSE: "a Close message",
          FrontendMsg.QUERY: "a Query message"}


def _emit_synth(queue: deque[Expect], out: list[bytes]) -> None:
    while queue and queue[0].kind == SYNTH:
        out.append(queue.popleft().payload)


_HANDLERS: dict[int, Callable[[PooledClient, ServerConn, bytes], None]] = {
    FrontendMsg.PARSE: PooledClient._parse,
    FrontendMsg.BIND: PooledClient._bind,
    FrontendMsg.DESCRIBE: PooledClient._describe,
    FrontendMsg.CLOSE: PooledClient._close,
}
