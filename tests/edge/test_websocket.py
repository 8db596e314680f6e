"""Postgres over WebSocket: the protocol bytes of a real session in binary messages."""

from __future__ import annotations

import struct

import aiohttp
import pytest

from pgfleet.pgwire import messages as m
from pgfleet.pgwire.protocol import BackendMsg, FrontendMsg
from pgfleet.pgwire.framing import Framer

pytestmark = pytest.mark.asyncio


def password_message(password: str) -> bytes:
    return m.message(FrontendMsg.PASSWORD, password.encode() + b"\0")


async def read_until(ws, kinds: set[int], buf: Framer) -> list[tuple[int, bytes]]:
    """Messages up to and including the first whose type is in `kinds` (or an error)."""
    got: list[tuple[int, bytes]] = []
    while True:
        msg = await ws.receive(timeout=60)
        assert msg.type == aiohttp.WSMsgType.BINARY, msg
        for kind, body in buf.messages(msg.data):
            got.append((kind, body))
            if kind in kinds or kind == BackendMsg.ERROR_RESPONSE:
                return got


async def test_pipelined_cleartext_password_and_query(edge, db):
    name, password = db
    startup = m.startup_message({"user": name, "database": name})
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"http://127.0.0.1:{edge.port}/v2?address={name}.db.localhost:5432") as ws:
            await ws.send_bytes(startup + password_message(password) + m.message(FrontendMsg.QUERY, b"SELECT 40 + 2\0"))
            buf = Framer()
            got = await read_until(ws, {BackendMsg.READY_FOR_QUERY}, buf)
            auth = [struct.unpack("!i", body[:4])[0] for kind, body in got if kind == BackendMsg.AUTHENTICATION]
            assert auth == [m.AUTH_CLEARTEXT, m.AUTH_OK]
            got = await read_until(ws, {BackendMsg.READY_FOR_QUERY}, buf)
            rows = [m.parse_data_row(body) for kind, body in got if kind == BackendMsg.DATA_ROW]
            assert rows == [[b"42"]]


async def test_without_a_pipelined_password_the_proxy_asks_for_scram(edge, db):
    name, password = db
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"http://127.0.0.1:{edge.port}/v2") as ws:
            await ws.send_bytes(m.startup_message({"user": name, "database": name}))
            got = await read_until(ws, {BackendMsg.AUTHENTICATION}, Framer())
            assert got[-1][0] == ord("R") and struct.unpack("!i", got[-1][1][:4])[0] == m.AUTH_SASL


async def test_wrong_cleartext_password_is_28P01(edge, db):
    name, password = db
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"http://127.0.0.1:{edge.port}/v2") as ws:
            await ws.send_bytes(m.startup_message({"user": name, "database": name}) + password_message("wrong"))
            got = await read_until(ws, {BackendMsg.READY_FOR_QUERY}, Framer())
            assert got[-1][0] == ord("E") and m.parse_error_fields(got[-1][1])["C"] == "28P01"


async def test_pooled_path_gives_a_pooled_session(edge, db, env):
    name, password = db
    async with aiohttp.ClientSession() as session:
        for path in ("/v2/pooled", "/v2/direct"):
            async with session.ws_connect(f"http://127.0.0.1:{edge.port}{path}") as ws:
                await ws.send_bytes(m.startup_message({"user": name, "database": name})
                                    + password_message(password) + m.message(FrontendMsg.QUERY, b"SELECT pg_backend_pid()\0"))
                buf = Framer()
                await read_until(ws, {BackendMsg.READY_FOR_QUERY}, buf)
                await read_until(ws, {BackendMsg.READY_FOR_QUERY}, buf)
    assert edge.pooled.pools, "the /pooled session went through the pooled listener"


async def test_text_frames_are_refused(edge):
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"http://127.0.0.1:{edge.port}/v2") as ws:
            await ws.send_str("SELECT 1")
            msg = await ws.receive(timeout=30)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1003
