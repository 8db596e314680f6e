"""The listener's HTTP/1.1 connections. The common request (`POST` or `OPTIONS`, HTTP/1.1, at
most MAX_HEADERS headers in MAX_HEAD bytes, a Content-Length body) is parsed and answered here,
and the connection kept alive; anything else (a WebSocket upgrade, a chunked body, HTTP/1.0,
`Expect`, another method, a malformed or oversized head) hands the connection, with every byte
received so far, to aiohttp's server, which answers or refuses it as it always did.

Why: aiohttp's per-request machinery (request and response objects, header preparation, its
keep-alive bookkeeping) cost ~45 us a request on the bench machine, a fifth of a one-row query
over HTTP (bench/http_sql.py); this path costs a few.

Limits: a head is complete within MAX_HEAD bytes or goes to aiohttp (which refuses it past its
8190-byte lines); a body is read only when the handler asks for it (after the password), and at
most READ_AHEAD bytes wait unread (a stranger's body stays in the socket); a connection without
a whole request for `idle_timeout_s` is closed; answers are written one at a time, the next
request waiting while the client does not read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import NamedTuple

log = logging.getLogger(__name__)

#: request line and headers, at most (longer heads go to aiohttp)
MAX_HEAD = 8190
MAX_HEADERS = 64
#: bytes received ahead of what the current request has read before reading stops
READ_AHEAD = 64 * 1024

#: bytes a header name may hold (RFC 9110 tokens)
_TOKEN = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#: control bytes (tab aside): never in a head but as its line ends
_CONTROL = bytes(range(0, 9)) + bytes(range(10, 32)) + b"\x7f"
_METHODS = frozenset((b"POST", b"OPTIONS"))
#: headers that ask for what only aiohttp does
_NOT_HERE = frozenset(("transfer-encoding", "upgrade", "expect"))


class Answer(NamedTuple):
    status: int
    body: bytes  # JSON (empty for 204)
    headers: Mapping[str, str]


class BodyTooLarge(Exception):
    pass


class Request:
    """What the handler reads of a request (the names aiohttp's BaseRequest has)."""

    __slots__ = ("method", "path", "headers", "remote", "transport", "keep_alive", "length", "start",
                 "consumed", "_conn")

    def __init__(self, conn: "HttpConnection", method: str, path: str, headers: dict[str, str], length: int,
                 start: int, keep_alive: bool) -> None:
        self._conn = conn
        self.method = method
        self.path = path
        self.headers = headers  # lower-case names
        self.remote = conn.remote
        self.transport = conn.transport
        self.length = length
        self.start = start  # where the body starts in the connection's buffer
        self.keep_alive = keep_alive
        self.consumed = False

    async def read(self) -> bytes:
        if self.length > self._conn.max_body:
            raise BodyTooLarge()
        end = self.start + self.length
        await self._conn.wait_for(end)
        self.consumed = True
        return bytes(self._conn.buffer[self.start:end])


Respond = Callable[[Request], Awaitable[Answer]]


class HttpConnection(asyncio.Protocol):
    def __init__(self, respond: Respond, aiohttp_protocol: Callable[[], asyncio.Protocol],
                 connections: set["HttpConnection"], max_body: int, idle_timeout_s: float) -> None:
        self.respond = respond
        self.aiohttp_protocol = aiohttp_protocol
        self.connections = connections
        self.max_body = max_body
        self.idle_timeout_s = idle_timeout_s
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self._loop = asyncio.get_running_loop()
        self._idle: asyncio.TimerHandle | None = None
        self._request: Request | None = None
        self._task: asyncio.Task | None = None
        self._limit = READ_AHEAD  # buffered bytes past which reading pauses
        self._reading = True
        self._wanted = 0  # the buffer length a waiting read needs
        self._waiter: asyncio.Future | None = None  # a read waiting for its body
        self._drained: asyncio.Future | None = None  # set while the client does not read answers

    # --- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        self.connections.add(self)
        self._idle = self._loop.call_later(self.idle_timeout_s, self._expire)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self._request is None:
            self._next()
        elif self._waiter is not None and len(self.buffer) >= self._wanted:
            if not self._waiter.done():
                self._waiter.set_result(None)
        if self._reading and len(self.buffer) > self._limit and self.transport is not None:
            self._reading = False
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return None  # the transport closes: a request in flight is cancelled (as aiohttp does)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # as aiohttp's handler_cancellation: the handler's finally blocks clean up
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionResetError("the client closed the connection"))
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)  # (no exception: no one may be waiting to retrieve it)
        self.transport = None

    def pause_writing(self) -> None:
        self._drained = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # --- requests ------------------------------------------------------------------------
    def _next(self) -> None:
        """Start the next request if its head is in the buffer."""
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if end < 0:
            if len(buffer) > MAX_HEAD:
                self._hand_over()
            return
        request = self._parse(bytes(buffer[:end]), end + 4)
        if request is None:
            self._hand_over()
            return
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._request = request
        self._task = self._loop.create_task(self._serve(request))

    def _parse(self, head: bytes, start: int) -> Request | None:
        """The request, or None for aiohttp (what this parser does not take, it does not judge)."""
        lines = head.split(b"\r\n")
        if len(lines) > MAX_HEADERS + 1 or len(head) - 2 * (len(lines) - 1) != len(head.translate(None, _CONTROL)):
            return None  # too many headers, or a control byte (a bare CR or LF, a NUL) somewhere
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[2] != b"HTTP/1.1" or parts[0] not in _METHODS:
            return None
        target = parts[1]
        if not target.startswith(b"/") or b"%" in target:
            return None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name.translate(None, _TOKEN):
                return None
            key = name.decode("ascii").lower()
            if key in headers or key in _NOT_HERE:
                return None
            headers[key] = value.strip(b" \t").decode("utf-8", "surrogateescape")
        length_text = headers.get("content-length", "0")
        if not length_text.isdigit() or len(length_text) > 18:
            return None
        try:
            path = target.split(b"?", 1)[0].decode("ascii")
        except UnicodeDecodeError:
            return None
        keep_alive = "close" not in headers.get("connection", "").lower().replace(" ", "").split(",")
        return Request(self, parts[0].decode("ascii"), path, headers, int(length_text), start, keep_alive)

    async def wait_for(self, size: int) -> None:
        """Until the buffer holds `size` bytes (reading on while it fills)."""
        if len(self.buffer) >= size:
            return
        self._limit = max(READ_AHEAD, size)
        if not self._reading and self.transport is not None:
            self._reading = True
            self.transport.resume_reading()
        self._wanted = size
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def _serve(self, request: Request) -> None:
        try:
            answer = await self.respond(request)
        except Exception:
            log.exception("HTTP request %s %s failed", request.method, request.path[:200])
            answer = Answer(500, b'{"message":"internal error"}', {})
        transport = self.transport
        if transport is None:
            return
        end = request.start + request.length
        # a body the handler did not read is skipped if it is here; else the connection ends
        keep = request.keep_alive and (
            request.consumed or (request.length <= self.max_body and len(self.buffer) >= end))
        transport.write(_serialise(answer, keep))
        if not keep:
            transport.close()
            return
        del self.buffer[:end]
        self._task = None
        self._limit = READ_AHEAD
        if self._drained is not None:  # the client is not reading its answers: wait for it
            await self._drained  # (the next request stays in the buffer meanwhile)
        self._request = None
        if self.transport is None:  # lost meanwhile
            return
        if not self._reading and len(self.buffer) <= self._limit:
            self._reading = True
            self.transport.resume_reading()
        self._idle = self._loop.call_later(self.idle_timeout_s, self._expire)
        self._next()  # a request the client sent ahead

    def _expire(self) -> None:
        self._idle = None
        if self._request is None and self.transport is not None:
            self.transport.close()

    def _hand_over(self) -> None:
        """This connection is aiohttp's from here, with what it has received."""
        transport = self.transport
        assert transport is not None
        self.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if not self._reading:
            self._reading = True
            transport.resume_reading()
        protocol = self.aiohttp_protocol()
        transport.set_protocol(protocol)
        self.transport = None
        protocol.connection_made(transport)
        data, self.buffer = bytes(self.buffer), bytearray()
        if data:
            protocol.data_received(data)  # type: ignore[attr-defined]


_STATUS_LINES: dict[int, bytes] = {}


def _serialise(answer: Answer, keep_alive: bool) -> bytes:
    status, body, headers = answer
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode("ascii")
    parts = [line]
    for name, value in headers.items():
        parts.append(f"{name}: {value}\r\n".encode("latin-1"))
    if status != 204:
        parts.append(b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body))
    if not keep_alive:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    if status != 204:
        parts.append(body)
    return b"".join(parts)
