"""A client that does not finish its startup (silent, or stalled half-way through SCRAM)
is dropped after the startup timeout, and leaves nothing behind (issue #4, limits)."""

from __future__ import annotations

import asyncio

import pytest

from pgfleet.pgwire import messages as m
from pgfleet.pgwire.protocol import BackendMsg
from pgfleet.proxy import server as proxy_server

TIMEOUT_S = 0.5


@pytest.fixture
def short_startup_timeout(monkeypatch):
    monkeypatch.setattr(proxy_server, "STARTUP_TIMEOUT_S", TIMEOUT_S)


async def _dropped(reader: asyncio.StreamReader) -> bytes:
    """Everything the proxy sends until it closes the connection (bounded wait)."""
    return await asyncio.wait_for(reader.read(), timeout=TIMEOUT_S * 20)


async def test_a_silent_client_is_dropped(env, short_startup_timeout):
    active = env.proxy.stats.active
    reader, writer = await asyncio.open_connection("127.0.0.1", env.proxy.port)
    try:
        assert await _dropped(reader) == b""
    finally:
        writer.close()
    assert env.proxy.stats.active == active


async def test_a_client_stalled_in_the_middle_of_a_startup_packet_is_dropped(env, short_startup_timeout):
    reader, writer = await asyncio.open_connection("127.0.0.1", env.proxy.port)
    try:
        packet = m.startup_message({"user": "x", "database": "x"})
        writer.write(packet[: len(packet) // 2])
        await writer.drain()
        assert await _dropped(reader) == b""
    finally:
        writer.close()


async def test_a_client_stalled_in_scram_is_dropped(env, short_startup_timeout):
    created = await env.fleet.create("stall")
    active = env.proxy.stats.active
    reader, writer = await asyncio.open_connection("127.0.0.1", env.proxy.port)
    try:
        writer.write(m.startup_message({"user": created.row.role, "database": "stall"}))
        await writer.drain()
        kind, body = await asyncio.wait_for(m.read_message(reader), timeout=10)
        assert kind == BackendMsg.AUTHENTICATION and int.from_bytes(body[:4], "big") == m.AUTH_SASL
        rest = await _dropped(reader)  # we never answer the SASL challenge
        assert rest == b"" or rest[:1] == b"E"
    finally:
        writer.close()
    assert env.proxy.stats.active == active
    assert env.fleet.rt[created.row.uuid].clients == 0
