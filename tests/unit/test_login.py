"""proxy.login's handshake over an in-memory stream: SSL and GSSAPI encryption refused
where there is no TLS, then the startup packet."""

from __future__ import annotations

import asyncio

import pytest

from pgfleet.pgwire import messages as m
from pgfleet.pgwire.protocol import SSL_REFUSED
from pgfleet.proxy.login import handshake


class _Writer:
    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data


async def test_encryption_requests_are_refused_without_tls_then_the_startup_is_read():
    reader = asyncio.StreamReader()
    gssenc = (8).to_bytes(4, "big") + m.GSSENC_REQUEST_CODE.to_bytes(4, "big")
    reader.feed_data(m.ssl_request() + gssenc + m.startup_message({"user": "u", "database": "d"}))
    writer = _Writer()
    packet, tls_used = await handshake(reader, writer, None)  # type: ignore[arg-type]
    assert isinstance(packet, m.StartupMessage) and packet.user == "u" and packet.database == "d"
    assert not tls_used and writer.written == SSL_REFUSED * 2


async def test_a_cancel_request_comes_back_as_it_is():
    reader = asyncio.StreamReader()
    reader.feed_data(m.cancel_request(7, 11))
    packet, _ = await handshake(reader, _Writer(), None)  # type: ignore[arg-type]
    assert packet == m.CancelRequest(7, 11)


async def test_an_oversized_startup_packet_is_a_protocol_error():
    reader = asyncio.StreamReader()
    reader.feed_data((m.MAX_STARTUP_LENGTH + 1).to_bytes(4, "big") + bytes(8))
    with pytest.raises(m.ProtocolError):
        await handshake(reader, _Writer(), None)  # type: ignore[arg-type]
