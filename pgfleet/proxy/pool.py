"""Transaction pooling: the server connections of one database (Pool), shared by its
pooled clients (pooled_client.py), each bound to a client only for a transaction.

A Pool opens connections up to its size, hands idle ones out at once (no task on the
per-transaction path), queues clients when all are in use, and learns and validates the
session parameters clients ask for (params.py) on a connection of its own.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from typing import TYPE_CHECKING, Callable

from pgfleet.drivers.base import Backend
from pgfleet.pgwire import messages as m
from pgfleet.pgwire.framing import Framer
from pgfleet.pgwire.protocol import BackendMsg

from . import params as pm
from .client_state import ClientPhase
from .connect import BackendRefused, open_session
from .guards import ProxyGuards
from .params import ParamRegistry, ParamSet
from .statements import SharedTexts

if TYPE_CHECKING:
    from .pooled_client import PooledClient

log = logging.getLogger(__name__)

#: how long the proxy waits for a database that is starting (or recovering) to accept a connection
CONNECT_TIMEOUT_S = 60.0


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
            if client.phase is ClientPhase.WAITING:
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
            if client.phase is ClientPhase.WAITING:
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
