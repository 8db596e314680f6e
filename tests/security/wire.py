"""A raw v3 protocol client for hostile-client tests: real sockets, real SCRAM (scramp's
client side), and nothing a well-behaved driver would add."""

from __future__ import annotations

import asyncio

from scramp import ScramClient

from pgfleet.pgwire import messages as m
from pgfleet.pgwire.protocol import BackendMsg, FrontendMsg


async def open_from(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to the proxy from a chosen loopback source address (all of
    127.0.0.0/8 is local on Linux), as if from another host."""
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def stall_after_startup(port: int, user: str, database: str, source: str = "127.0.0.1"):
    """A connection that sends its startup packet, gets the SASL challenge, and stalls."""
    reader, writer = await open_from(port, source)
    writer.write(m.startup_message({"user": user, "database": database}))
    kind, body = await asyncio.wait_for(m.read_message(reader), 30)
    assert kind == BackendMsg.AUTHENTICATION and int.from_bytes(body[:4], "big") == m.AUTH_SASL, (kind, body)
    return reader, writer


async def login(port: int, user: str, password: str, database: str, source: str = "127.0.0.1"
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An authenticated session, read up to its first ReadyForQuery; raises AssertionError
    carrying the error fields if the proxy refuses."""
    reader, writer = await open_from(port, source)
    writer.write(m.startup_message({"user": user, "database": database}))
    client = ScramClient(["SCRAM-SHA-256"], "", password)
    while True:
        kind, body = await asyncio.wait_for(m.read_message(reader), 60)
        if kind == BackendMsg.ERROR_RESPONSE:
            writer.close()
            raise LoginRefused(m.parse_error_fields(body))
        if kind == BackendMsg.AUTHENTICATION:
            code = int.from_bytes(body[:4], "big")
            if code == m.AUTH_SASL:
                first = client.get_client_first().encode()
                payload = b"SCRAM-SHA-256\0" + len(first).to_bytes(4, "big") + first
                writer.write(m.message(FrontendMsg.PASSWORD, payload))
            elif code == m.AUTH_SASL_CONTINUE:
                client.set_server_first(body[4:].decode())
                writer.write(m.message(FrontendMsg.PASSWORD, client.get_client_final().encode()))
            elif code == m.AUTH_SASL_FINAL:
                client.set_server_final(body[4:].decode())
        elif kind == BackendMsg.READY_FOR_QUERY:
            return reader, writer


class LoginRefused(Exception):
    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(f"{fields.get('C')}: {fields.get('M')}")
        self.fields = fields


async def error_then_eof(reader: asyncio.StreamReader, timeout: float = 30) -> dict[str, str]:
    """The ErrorResponse the proxy ends a session with, and the end of the stream after it."""
    async with asyncio.timeout(timeout):
        while True:
            kind, body = await m.read_message(reader)
            if kind == BackendMsg.ERROR_RESPONSE:
                fields = m.parse_error_fields(body)
                break
        try:
            rest = await reader.read()
        except ConnectionError:  # closed while the client was still sending (a reset): closed too
            rest = b""
        assert rest == b"", "the connection stayed open after the error"
    return fields
