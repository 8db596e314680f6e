"""Opening a server session on a database's Postgres, for the direct and pooled listeners.

A Postgres in crash recovery (after a backend was killed), or still starting, answers a
startup packet with 57P03 (cannot_connect_now). That is a wait, not an answer for the client:
the proxy retries until the database accepts connections or the connect timeout passes.
"""

from __future__ import annotations

import asyncio

from pgfleet.drivers.base import Backend
from pgfleet.pgwire import messages as m
from pgfleet.pgwire.protocol import BackendMsg

from .errors import ClientError

CANNOT_CONNECT_NOW = "57P03"
_FIRST_RETRY_S = 0.005
_MAX_RETRY_S = 0.1


class BackendRefused(Exception):
    """The database answered the startup with an ErrorResponse (other than 57P03)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.fields = m.parse_error_fields(body)
        super().__init__(self.fields.get("M", "the database refused the connection"))


class _NotYet(Exception):
    pass


async def open_session(backend: Backend, params: dict[str, str], timeout_s: float
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, list[tuple[int, bytes]]]:
    """A server session (startup without a password, as the host is trusted by the backend):
    its reader, writer and every message up to and including the first ReadyForQuery.
    Raises ClientError (unreachable, or still not accepting connections at the timeout) or
    BackendRefused."""
    delay = _FIRST_RETRY_S
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            reader, writer = await backend.open_connection()
        except OSError as exc:
            raise ClientError("08006", f"could not reach the database: {exc}")
        try:
            writer.write(m.startup_message(params))
            async with asyncio.timeout_at(deadline):
                replies = await _until_ready(reader)
        except _NotYet:
            writer.close()
            if loop.time() + delay > deadline:
                raise ClientError(CANNOT_CONNECT_NOW, f"the database is still starting up after {timeout_s:.0f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_RETRY_S)
            continue
        except TimeoutError:
            writer.close()
            raise ClientError(CANNOT_CONNECT_NOW, f"the database did not answer within {timeout_s:.0f} s")
        except BaseException:
            writer.close()
            raise
        return reader, writer, replies


async def _until_ready(reader: asyncio.StreamReader) -> list[tuple[int, bytes]]:
    replies: list[tuple[int, bytes]] = []
    while True:
        kind, body = await m.read_message(reader, max_length=m.MAX_READ_WHOLE)
        if kind == BackendMsg.AUTHENTICATION:
            if int.from_bytes(body[:4], "big") != m.AUTH_OK:
                raise ClientError("28000", "the database asked the proxy for a password")
            continue
        if kind == BackendMsg.ERROR_RESPONSE:
            if m.parse_error_fields(body).get("C") == CANNOT_CONNECT_NOW:
                raise _NotYet()
            raise BackendRefused(body)
        replies.append((kind, body))
        if kind == BackendMsg.READY_FOR_QUERY:
            return replies
