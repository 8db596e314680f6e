"""Hostile clients of the HTTP/WebSocket listener (pgfleet.edge), before and after auth:
bounded connections, time, bodies, messages; no pool slot before a password is proven;
fuzzed bodies and headers never get a 5xx or take the listener down."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import fleet_on_own_loop


@pytest.fixture
async def strict_edge(env, pooled):
    from pgfleet.edge.server import EdgeServer
    from pgfleet.edge.settings import EdgeSettings

    server = EdgeServer(env.fleet, env.proxy, pooled, "127.0.0.1", 0, settings=EdgeSettings(
        max_request_bytes=16 * 1024, max_response_bytes=64 * 1024, max_connections=4, idle_timeout_s=1.0))
    await server.start()
    yield server
    await server.close()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """The server closed the connection (EOF, after whatever it sent) within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            data = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
        except asyncio.TimeoutError:
            return False
        except ConnectionError:
            return True
        if not data:
            return True
    return False


async def test_half_sent_headers_are_dropped_after_the_idle_timeout(strict_edge):
    reader, writer = await asyncio.open_connection("127.0.0.1", strict_edge.port)
    writer.write(b"POST /sql HTTP/1.1\r\nHost: x\r\nNeon-Conn")  # and never the rest
    assert await closed_within(reader, 10)
    writer.close()


async def test_connections_over_the_cap_are_closed_at_once(strict_edge):
    held = [await asyncio.open_connection("127.0.0.1", strict_edge.port) for _ in range(4)]
    reader, writer = await asyncio.open_connection("127.0.0.1", strict_edge.port)
    assert await closed_within(reader, 5)
    assert strict_edge.refused_connections >= 1
    writer.close()
    for _, w in held:
        w.close()
    deadline = time.monotonic() + 10
    async with httpx.AsyncClient() as client:  # once they are gone, others get in again
        while True:
            try:
                r = await client.options(f"http://127.0.0.1:{strict_edge.port}/sql")
                if r.status_code == 204:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the listener did not take connections again"
            await asyncio.sleep(0.05)


async def test_huge_headers_and_bodies_are_refused(strict_edge, env):
    created = await env.fleet.create("big", cooldown_ms=600_000)
    async with httpx.AsyncClient() as client:
        r = await client.post(f"http://127.0.0.1:{strict_edge.port}/sql", content=b"{}",
                              headers={"Neon-Connection-String": "postgresql://a:b@c/" + "d" * 20000})
        assert r.status_code in (400, 431)
        r = await client.post(f"http://127.0.0.1:{strict_edge.port}/sql", content=b"x" * 100_000,
                              headers={"Neon-Connection-String": f"postgresql://big:{created.password}@c/big"})
        assert r.status_code == 413 and "limit" in r.json()["message"]


async def test_no_pool_slot_or_wake_before_the_password_is_proven(strict_edge, env):
    created = await env.fleet.create("victim", cooldown_ms=600_000)
    await env.fleet.suspend("victim")
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(3):
            r = await client.post(f"http://127.0.0.1:{strict_edge.port}/sql", json={"query": "SELECT 1"},
                                  headers={"Neon-Connection-String": "postgresql://victim:guess@x/victim"})
            assert r.status_code == 400 and r.json()["code"] == "28P01"
    assert env.fleet.get("victim").state == "standby"  # not woken by strangers
    assert not strict_edge.pooled.pools  # no server connection opened for them
    assert created.password  # the right one works (and wakes it)
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.post(f"http://127.0.0.1:{strict_edge.port}/sql", json={"query": "SELECT 1"},
                              headers={"Neon-Connection-String": f"postgresql://victim:{created.password}@x/victim"})
    assert r.status_code == 200


async def test_websocket_message_over_the_limit_closes_it(strict_edge):
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"http://127.0.0.1:{strict_edge.port}/v2") as ws:
            await ws.send_bytes(b"\0" * 20_000)
            msg = await ws.receive(timeout=10)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)


async def test_websocket_garbage_gets_a_protocol_error(strict_edge):
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"http://127.0.0.1:{strict_edge.port}/v2") as ws:
            await ws.send_bytes(b"\x00\x00\x00\x08garbage!")
            msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.BINARY and msg.data[:1] == b"E"


# --- fuzzed bodies and headers, on one fleet shared across examples ------------------------------
@pytest.fixture(scope="module")
def served():
    from pgfleet.edge.server import EdgeServer
    from pgfleet.edge.settings import EdgeSettings
    from pgfleet.proxy.server import ProxyServer

    with fleet_on_own_loop("pgfleet-edgefuzz-") as (loop, fleet):
        direct = ProxyServer(fleet, "127.0.0.1", 0)
        pooled = ProxyServer(fleet, "127.0.0.1", 0, mode="transaction")
        edge = EdgeServer(fleet, direct, pooled, "127.0.0.1", 0,
                          settings=EdgeSettings(max_request_bytes=64 * 1024, max_response_bytes=64 * 1024,
                                                request_timeout_s=20))

        async def up():
            await direct.start()
            await pooled.start()
            await edge.start()
            return await fleet.create("fuzz", cooldown_ms=600_000)

        created = loop.run_until_complete(up())
        try:
            yield loop, edge, created.password
        finally:
            async def down():
                await edge.close()
                await pooled.close()
                await direct.close()
                await fleet.delete("fuzz")
            loop.run_until_complete(down())


def post(loop, edge, content: bytes, headers: dict[str, str]) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(timeout=30) as client:
            return await client.post(f"http://127.0.0.1:{edge.port}/sql", content=content, headers=headers)
    return loop.run_until_complete(go())


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)
_query = st.fixed_dictionaries({"query": st.sampled_from(["SELECT $1::text", "SELECT 1", "SELECT $1", "", ";",
                                                          "SELECT $1::int", "BEGIN", "COMMIT", "SET search_path = x"])
                                 | st.text(max_size=30)},
                                optional={"params": st.lists(_json, max_size=3) | _json, "arrayMode": _json})
_bodies = (_query | st.fixed_dictionaries({"queries": st.lists(_query, max_size=4) | _json}) | _json).map(
    lambda doc: json.dumps(doc).encode()) | st.binary(max_size=200)
_header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60).map(str.strip)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_bodies)
def test_fuzzed_bodies_never_get_a_server_error(served, body):
    loop, edge, password = served
    r = post(loop, edge, body, {"Neon-Connection-String": f"postgresql://fuzz:{password}@x/fuzz",
                                "Neon-Raw-Text-Output": "true", "Neon-Array-Mode": "true"})
    assert r.status_code in (200, 400, 413), (r.status_code, r.text)
    assert isinstance(r.json(), dict)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conn=_header_text, level=_header_text, flag=_header_text)
def test_fuzzed_headers_never_get_a_server_error(served, conn, level, flag):
    loop, edge, password = served
    for conn_string in (conn, f"postgresql://fuzz:{password}@x/fuzz"):
        r = post(loop, edge, b'{"queries": [{"query": "SELECT 1"}]}',
                 {"Neon-Connection-String": conn_string, "Neon-Batch-Isolation-Level": level,
                  "Neon-Batch-Read-Only": flag, "Neon-Array-Mode": flag, "Neon-Raw-Text-Output": flag})
        assert r.status_code in (200, 400), (r.status_code, r.text)
        assert "message" in r.json() or "results" in r.json()


async def test_failed_http_logins_back_off_like_the_proxy_listeners(strict_edge, env):
    """Guessing passwords over HTTP meets the same login backoff (per role and source) as the
    proxy's listeners: after the free failures even the right password waits, and nothing wakes."""
    from pgfleet.proxy.guards import GuardLimits, LoginThrottle

    limits = GuardLimits(free_login_failures=3, backoff_base_s=60.0)  # long enough to outlast a slow host
    strict_edge.pooled.guards.logins = LoginThrottle(limits)
    created = await env.fleet.create("guessed", cooldown_ms=600_000)
    await env.fleet.suspend("guessed")
    url = f"http://127.0.0.1:{strict_edge.port}/sql"
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(3):
            r = await client.post(url, json={"query": "SELECT 1"},
                                  headers={"Neon-Connection-String": "postgresql://guessed:guess@x/guessed"})
            assert r.status_code == 400 and r.json()["code"] == "28P01"
        r = await client.post(url, json={"query": "SELECT 1"}, headers={
            "Neon-Connection-String": f"postgresql://guessed:{created.password}@x/guessed"})
    assert r.status_code == 429 and r.json()["code"] == "28000", r.text
    assert "too many failed login attempts" in r.json()["message"]
    assert env.fleet.get("guessed").state == "standby"
    assert strict_edge.pooled.guards.logins.refused == 1
