"""Before authentication a client can neither wake a database nor hold its slots
(issue 10, item 5): connection limits count authenticated sessions only; unauthenticated
connections are capped per source address, per database and in total, and timed out."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from pgfleet.fleet.states import State
from pgfleet.pgwire import messages as m
from pgfleet.pgwire.protocol import BackendMsg, FrontendMsg
from pgfleet.proxy.guards import GuardLimits, ProxyGuards
from pgfleet.proxy.server import ProxyServer

from .wire import login, open_from, stall_after_startup

STALLED = 50


@pytest.fixture
async def listeners(env, pooled):
    return {"direct": env.proxy, "pooled": pooled}


def test_the_default_startup_timeout_is_short():
    assert GuardLimits().startup_timeout_s <= 10


@pytest.mark.parametrize("listener", ["direct", "pooled"])
async def test_stalled_unauthenticated_sockets_do_not_stop_a_real_client(env, listeners, listener):
    server = listeners[listener]
    created = await env.fleet.create("busy", max_direct_clients=STALLED, max_pooled_clients=STALLED)
    stalled = [await stall_after_startup(server.port, created.row.role, "busy") for _ in range(STALLED)]
    try:
        assert server.guards.pending.total == STALLED
        assert server.stats.per_database.get(created.row.uuid, 0) == 0  # no slot taken
        async with await psycopg.AsyncConnection.connect(
                host="127.0.0.1", port=server.port, dbname="busy", user="busy", password=created.password,
                connect_timeout=30, autocommit=True) as conn:
            assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
    finally:
        for _, w in stalled:
            w.close()


@pytest.mark.parametrize("listener", ["direct", "pooled"])
async def test_a_startup_packet_alone_does_not_wake_a_standby_database(env, listeners, listener):
    server = listeners[listener]
    created = await env.fleet.create("sleepy")
    uuid = created.row.uuid
    await env.fleet.suspend(uuid)
    assert env.fleet.get(uuid).state == State.STANDBY
    reader, writer = await stall_after_startup(server.port, created.row.role, "sleepy")
    try:
        # the proxy has routed the client and sent its challenge: nothing started the database
        assert env.fleet.get(uuid).state == State.STANDBY
        writer.write(m.message(FrontendMsg.PASSWORD, b"SCRAM-SHA-256\0" + (4).to_bytes(4, "big") + b"n,,x"))  # garbage
        kind, body = await asyncio.wait_for(m.read_message(reader), 30)
        assert kind == BackendMsg.ERROR_RESPONSE
        assert env.fleet.get(uuid).state == State.STANDBY
    finally:
        writer.close()
    # an authenticated client wakes it
    r, w = await login(server.port, created.row.role, created.password, "sleepy")
    w.close()
    assert env.fleet.get(uuid).state == State.RUNNING


@pytest.mark.parametrize("mode", ["session", "transaction"])
async def test_unauthenticated_connections_are_capped_per_source_database_and_in_total(env, mode):
    guards = ProxyGuards(GuardLimits(max_pending=5, max_pending_per_source=3, max_pending_per_database=4))
    server = ProxyServer(env.fleet, "127.0.0.1", 0, mode=mode, guards=guards)
    await server.start()
    held = []
    try:
        a = await env.fleet.create("capa")
        b = await env.fleet.create("capb")
        held += [await stall_after_startup(server.port, "capa", "capa", "127.0.0.2") for _ in range(3)]
        # a fourth from the same address is refused at once
        fields = await _refused(server.port, "capa", "127.0.0.2")
        assert fields["C"] == "53300" and "your address" in fields["M"]
        held.append(await stall_after_startup(server.port, "capa", "capa", "127.0.0.3"))
        # database capa has 4 authenticating: a fifth for it is refused, from anywhere
        fields = await _refused(server.port, "capa", "127.0.0.4")
        assert fields["C"] == "53300" and "this database" in fields["M"]
        held.append(await stall_after_startup(server.port, "capb", "capb", "127.0.0.4"))
        # 5 in total: nobody else may start authenticating
        fields = await _refused(server.port, "capb", "127.0.0.5")
        assert fields["C"] == "53300"
        for _, w in held:
            w.close()
        held.clear()
        await _until(lambda: guards.pending.total == 0)
        # the places are free again; a real client gets in
        _, w = await login(server.port, b.row.role, b.password, "capb", "127.0.0.2")
        w.close()
        assert a.row.uuid not in guards.pending.by_database
    finally:
        for _, w in held:
            w.close()
        await server.close()


async def _refused(port: int, database: str, source: str) -> dict[str, str]:
    reader, writer = await open_from(port, source)
    try:
        writer.write(m.startup_message({"user": database, "database": database}))
        kind, body = await asyncio.wait_for(m.read_message(reader), 30)
        assert kind == BackendMsg.ERROR_RESPONSE, kind
        return m.parse_error_fields(body)
    finally:
        writer.close()


async def _until(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
