"""Transaction pooling: a server connection is bound to a client only for a transaction.

Protocol-level named prepared statements keep working across server connections (as
PgBouncer 1.21+ does): each client's statements are remembered by name; each server
connection remembers which statements it has prepared, under names derived from their
text, and a statement is (re)prepared on whichever server connection a client lands on.
Responses the client did not ask for are dropped, and responses for work the proxy
skipped (a Parse the server already had, a Close it keeps) are synthesised in order.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import struct
from collections import deque
from typing import Callable

from pgfleet.drivers.base import Backend
from pgfleet.pgwire import messages as m

from .frames import MessageBuffer

log = logging.getLogger(__name__)

# expectation kinds: how the proxy treats the server's answer to one request
FWD, DROP, SYNTH, SYNC = 0, 1, 2, 3
_ASYNC = frozenset(b"NSA")  # NoticeResponse, ParameterStatus, NotificationResponse
_EXEC_END = frozenset(b"CIs")  # CommandComplete, EmptyQueryResponse, PortalSuspended
PARSE_COMPLETE = m.message(b"1")
CLOSE_COMPLETE = m.message(b"3")


class Expect:
    __slots__ = ("kind", "ends", "payload", "on_error")

    def __init__(self, kind: int, ends: frozenset[int] = frozenset(), payload: bytes = b"",
                 on_error: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self.ends = ends
        self.payload = payload
        self.on_error = on_error


def server_statement_name(parse_rest: bytes) -> str:
    """The name a statement has on every server connection: from its text and types."""
    return "pgf_" + hashlib.blake2b(parse_rest, digest_size=10).hexdigest()


class ServerConn(asyncio.Protocol):
    """One pooled connection to a database's Postgres."""

    def __init__(self, pool: "Pool") -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.client: "PooledClient | None" = None
        self.prepared: set[str] = set()
        self.process_id = 0
        self.secret_key = 0
        self.closed = False

    def data_received(self, data: bytes) -> None:
        if self.client is not None:
            self.client.from_server(data)
        else:  # an idle connection should say nothing but notices; anything else is suspect
            log.debug("idle pooled server connection sent %d bytes", len(data))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
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

    def __init__(self, name: str, role: str, size: int, backend_fn: Callable[[], "asyncio.Future[Backend]"]):
        self.name = name
        self.role = role
        self.size = size
        self.backend_fn = backend_fn  # wakes the database if needed
        self.idle: deque[ServerConn] = deque()
        self.conns: set[ServerConn] = set()
        self.waiters: deque[asyncio.Future] = deque()
        self.params: dict[str, str] = {}
        self._opening = 0

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
            reader, writer = await backend.open_connection()
            try:
                writer.write(m.startup_message({
                    "user": self.role, "database": backend.database, "application_name": "pgfleet-pool",
                }))
                conn = ServerConn(self)
                while True:
                    kind, body = await m.read_message(reader)
                    if kind == b"S":
                        name, value, _ = body.split(b"\0", 2)
                        self.params[name.decode()] = value.decode()
                    elif kind == b"K":
                        conn.process_id, conn.secret_key = struct.unpack("!ii", body[:8])
                    elif kind == b"E":
                        raise ConnectionError(m.parse_error_fields(body).get("M", "server refused the pool"))
                    elif kind == b"Z":
                        break
            except BaseException:
                writer.close()
                raise
            conn.writer = writer  # a collected StreamWriter closes its transport
            conn.transport = writer.transport  # type: ignore[assignment]
            conn.transport.set_protocol(conn)
            conn.transport.resume_reading()
            self.conns.add(conn)
            return conn
        finally:
            self._opening -= 1

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

    def close(self) -> None:
        for conn in list(self.conns):
            conn.close()
        self.conns.clear()
        self.idle.clear()


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

    def __init__(self, pool: Pool, transport: asyncio.Transport, on_busy: Callable[[bool], None]) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = transport
        self.on_busy = on_busy
        self.server: ServerConn | None = None
        self.buffer = MessageBuffer()
        self._scarry = b""  # a partial server message carried to the next read
        self.backlog: list[tuple[int, bytes]] = []
        self.acquiring: asyncio.Task | None = None
        self.queue: deque[Expect] = deque()
        self.statements: dict[str, tuple[str, bytes]] = {}  # client name -> (server name, Parse rest)
        self.in_tx = False
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._out: list[bytes] = []  # to the server, flushed once per read
        transport.set_protocol(self)

    def start(self, leftover: bytes = b"") -> None:
        if leftover:
            self.data_received(leftover)
        if self.transport is not None:
            self.transport.resume_reading()

    # --- client -> server ------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.server is None and not self.backlog and self.acquiring is None and data[:1] != b"X":
            conn = self.pool.try_acquire()
            if conn is not None:
                self.on_busy(True)
                conn.client = self
                self.server = conn
        if self.server is not None and not self.backlog and not len(self.buffer) and self._forward_whole(data):
            return
        try:
            msgs = self.buffer.feed(data)
        except m.ProtocolError as exc:
            self._fatal("08P01", f"protocol violation: {exc}")
            return
        if self.server is None or self.backlog:
            self.backlog.extend(msgs)
            self._need_server()
            return
        self._handle(msgs)

    def _forward_whole(self, data: bytes) -> bool:
        """The common case, taken without copying: whole messages that need no rewriting
        (simple queries, Execute/Sync of unnamed statements, COPY data) go out as they came."""
        exps: list[Expect] = []
        pos, end = 0, len(data)
        while pos < end:
            if end - pos < 5:
                return False
            kind = data[pos]
            mend = pos + 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
            if mend > end or mend < pos + 5:
                return False
            exp = _PASS_THROUGH.get(kind, _NOT_FAST)
            if exp is _NOT_FAST or (kind == 0x51 and data[pos + 5] in b"dD"):
                return False
            if exp is not None:
                exps.append(exp)
            pos = mend
        self.queue.extend(exps)
        self.server.transport.write(data)  # type: ignore[union-attr]
        return True

    def _need_server(self) -> None:
        if self.acquiring is not None or not self.backlog:
            return
        if self.backlog[0][0] == 0x58:  # Terminate while idle: no server needed
            self.close()
            return
        self.on_busy(True)
        conn = self.pool.try_acquire()
        if conn is not None:
            self._attach(conn)
            return
        self.transport.pause_reading()  # type: ignore[union-attr]
        self.acquiring = asyncio.ensure_future(self.pool.acquire())
        self.acquiring.add_done_callback(self._acquired)

    def _acquired(self, task: asyncio.Task) -> None:
        self.acquiring = None
        if task.cancelled():
            return
        if task.exception() is not None:
            self.on_busy(False)
            self._fatal("08006", f"could not get a server connection: {task.exception()}")
            return
        conn = task.result()
        if self.done.done():
            self.pool.release(conn)
            return
        if self.transport is not None:
            self.transport.resume_reading()
        self._attach(conn)

    def _attach(self, conn: ServerConn) -> None:
        conn.client = self
        self.server = conn
        backlog, self.backlog = self.backlog, []
        self._handle(backlog)

    def _handle(self, msgs: list[tuple[int, bytes]]) -> None:
        out = self._out
        server = self.server
        assert server is not None
        for i, (kind, body) in enumerate(msgs):
            if kind == 0x58:  # 'X' Terminate
                self._flush()
                self.close()
                return
            handler = _HANDLERS.get(kind)
            if kind == 0x51 and body[:1] in b"dD":  # Query: DEALLOCATE / DISCARD need bookkeeping
                body = self._sql_deallocate(server, body)
            if handler is None:
                out.append(_raw(kind, body))  # Q, S, H, E, d, c, f, F ...: forwarded as they are
                exp = _PASS_THROUGH.get(kind)
                if exp is not None and exp is not _NOT_FAST:
                    self.queue.append(exp)
            else:
                handler(self, server, body)
        self._flush()

    def _flush(self) -> None:
        if self._out and self.server is not None and self.server.transport is not None:
            self.server.transport.write(b"".join(self._out))
        self._out.clear()

    def _parse(self, server: ServerConn, body: bytes) -> None:
        end = body.index(b"\0")
        name, rest = body[:end], body[end + 1 :]
        if not name:
            self._out.append(_raw(0x50, body))
            self.queue.append(Expect(FWD, frozenset(b"1")))
            return
        sname = server_statement_name(rest)
        self.statements[name.decode()] = (sname, rest)
        if sname in server.prepared:
            self._synth(PARSE_COMPLETE)
        else:
            self._prepare_on(server, sname, rest, FWD)

    def _prepare_on(self, server: ServerConn, sname: str, rest: bytes, kind: int) -> None:
        server.prepared.add(sname)
        self._out.append(_raw(0x50, sname.encode() + b"\0" + rest))
        self.queue.append(Expect(kind, frozenset(b"1"), on_error=lambda: server.prepared.discard(sname)))

    def _server_name(self, server: ServerConn, client_name: bytes) -> bytes:
        """Map a client statement name to the server's, preparing it there if needed."""
        if not client_name:
            return client_name
        known = self.statements.get(client_name.decode(errors="replace"))
        if known is None:
            return client_name  # unknown: the server reports 26000 itself
        sname, rest = known
        if sname not in server.prepared:
            self._prepare_on(server, sname, rest, DROP)
        return sname.encode()

    def _bind(self, server: ServerConn, body: bytes) -> None:
        p_end = body.index(b"\0")
        s_end = body.index(b"\0", p_end + 1)
        sname = self._server_name(server, body[p_end + 1 : s_end])
        self._out.append(_raw(0x42, body[: p_end + 1] + sname + body[s_end:]))
        self.queue.append(Expect(FWD, frozenset(b"2")))

    def _describe(self, server: ServerConn, body: bytes) -> None:
        if body[:1] == b"S":
            sname = self._server_name(server, body[1:-1])
            self._out.append(_raw(0x44, b"S" + sname + b"\0"))
            self.queue.append(Expect(FWD, frozenset(b"t")))  # ParameterDescription, then
        else:
            self._out.append(_raw(0x44, body))
        self.queue.append(Expect(FWD, frozenset(b"Tn")))  # RowDescription or NoData

    def _close(self, server: ServerConn, body: bytes) -> None:
        if body[:1] == b"S" and body[1:-1]:
            # the server keeps it for the next client that prepares the same statement
            self.statements.pop(body[1:-1].decode(errors="replace"), None)
            self._synth(CLOSE_COMPLETE)
            return
        self._out.append(_raw(0x43, body))
        self.queue.append(Expect(FWD, frozenset(b"3")))

    def _sql_deallocate(self, server: ServerConn, body: bytes) -> bytes:
        """SQL that drops prepared statements (psycopg sends DEALLOCATE ALL after a DROP or
        ROLLBACK): keep the statement maps true, and translate a client's name to the
        server's."""
        m_ = _DEALLOCATE.match(body)
        if m_ is None:
            return body
        target = m_.group("name")
        if target is None or target.upper() == b"ALL":  # DISCARD ALL or DEALLOCATE ALL
            server.prepared.clear()
            self.statements.clear()
            return body
        known = self.statements.pop(target.strip(b'"').decode(errors="replace"), None)
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
        """Walk the server's messages in place: runs of messages the client should see are
        written as slices of what arrived (usually the whole read, uncopied)."""
        if self._scarry:
            data, self._scarry = self._scarry + data, b""
        queue = self.queue
        out: list[bytes] = []
        release = False
        pos, run, end = 0, 0, len(data)
        while end - pos >= 5:
            kind = data[pos]
            mend = pos + 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
            if mend < pos + 5:
                self._fatal("08P01", "the database broke the protocol: message length below 4")
                return
            if mend > end:
                break
            if kind in _ASYNC:
                pos = mend
                continue
            if queue and queue[0].kind == SYNTH:
                out.append(data[run:pos])
                _emit_synth(queue, out)
                run = pos
            if kind == 0x45:  # ErrorResponse: the server now skips to the next Sync
                while queue and queue[0].kind != SYNC:
                    e = queue.popleft()
                    if e.on_error is not None:
                        e.on_error()
                pos = mend
                continue
            head = queue[0] if queue else None
            if head is not None:
                if head.kind == DROP:
                    out.append(data[run:pos])
                    run = mend
                if kind in head.ends:
                    queue.popleft()
            if kind == 0x5A:  # ReadyForQuery
                self.in_tx = data[pos + 5] != 0x49
                if queue and queue[0].kind == SYNTH:
                    out.append(data[run:mend])
                    _emit_synth(queue, out)
                    run = mend
                release = not queue and not self.in_tx
            pos = mend
        if run < pos:
            out.append(data[run:pos])
        if pos < end:
            self._scarry = data[pos:]
        if self.transport is not None and out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if release:
            self._release_server()

    def _release_server(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            self.pool.release(server)
        self.on_busy(False)
        if self.backlog:
            self._need_server()

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
        self.transport = None
        self.close()

    def _fatal(self, sqlstate: str, text: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(m.error_response(sqlstate, text))
        self.close()

    def close(self) -> None:
        if self.done.done():
            return
        if self.acquiring is not None:
            self.acquiring.cancel()
        server, self.server = self.server, None
        if server is not None:
            # mid-transaction or with answers pending, its state is unknown: do not reuse it
            if self.queue or self.in_tx:
                self.pool.discard(server)
            else:
                self.pool.release(server)
            self.on_busy(False)
        if self.transport is not None:
            self.transport.close()
        self.done.set_result(None)

    def cancel_target(self) -> tuple[int, int] | None:
        if self.server is None:
            return None
        return self.server.process_id, self.server.secret_key


# Answers expected for messages forwarded unchanged (shared: expectations are read-only).
_NOT_FAST = Expect(FWD)
_PASS_THROUGH: dict[int, Expect | None] = {
    0x51: Expect(SYNC, frozenset(b"Z")),  # Query
    0x53: Expect(SYNC, frozenset(b"Z")),  # Sync
    0x46: Expect(SYNC, frozenset(b"Z")),  # FunctionCall
    0x45: Expect(FWD, _EXEC_END),  # Execute
    0x48: None, 0x64: None, 0x63: None, 0x66: None,  # Flush, CopyData, CopyDone, CopyFail
}

_DEALLOCATE = re.compile(
    rb"^\s*(?:DISCARD\s+ALL|DEALLOCATE\s+(?:PREPARE\s+)?(?P<name>ALL|\"[^\"]+\"|[A-Za-z_][A-Za-z0-9_$]*))\s*;?\s*\x00$",
    re.IGNORECASE,
)


def _emit_synth(queue: deque[Expect], out: list[bytes]) -> None:
    while queue and queue[0].kind == SYNTH:
        out.append(queue.popleft().payload)


def _raw(kind: int, body: bytes) -> bytes:
    return bytes((kind,)) + (len(body) + 4).to_bytes(4, "big") + body


_HANDLERS: dict[int, Callable[[PooledClient, ServerConn, bytes], None]] = {
    0x50: PooledClient._parse,  # 'P'
    0x42: PooledClient._bind,  # 'B'
    0x44: PooledClient._describe,  # 'D'
    0x43: PooledClient._close,  # 'C'
}
