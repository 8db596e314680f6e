"""The proxy with a real fleet and real Postgres: auth, routing, errors, wake, cancel,
scale to zero. Clients are real libpq (psycopg 3)."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import psycopg
import pytest

from pgfleet.fleet.states import State
from pgfleet.pgwire import messages as m

from .conftest import startup_error
from .polling import until


async def connect(env, name, password, **kw):
    return await psycopg.AsyncConnection.connect(**env.conninfo(name, password, **kw), autocommit=True)


async def scalar(conn, sql):
    cur = await conn.execute(sql)
    return (await cur.fetchone())[0]


async def test_scram_good_password_reaches_the_database(env):
    created = await env.fleet.create("shop")
    async with await connect(env, "shop", created.password) as conn:
        assert await scalar(conn, "SELECT current_user") == "shop"
        assert await scalar(conn, "SELECT current_database()") == "shop"  # the URI's /shop
        await conn.execute("CREATE TABLE t(x int)")
        await conn.execute("INSERT INTO t VALUES (7)")
        assert await scalar(conn, "SELECT sum(x) FROM t") == 7


async def test_bad_password_is_28P01(env):
    await env.fleet.create("shop")
    with pytest.raises(psycopg.OperationalError) as exc:
        await connect(env, "shop", "wrong")
    assert "password authentication failed" in str(exc.value)
    assert env.proxy.stats.auth_failures == 1


async def test_wrong_user_is_28P01(env):
    created = await env.fleet.create("shop")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        await psycopg.AsyncConnection.connect(**{**env.conninfo("shop", created.password), "user": "postgres"})


async def test_unknown_database_is_3D000(env):
    fields = await startup_error(env.proxy.port, {"user": "x", "database": "nope"})
    assert fields["C"] == "3D000" and fields["S"] == "FATAL"


async def test_database_being_deleted_is_57P03(env):
    created = await env.fleet.create("going")
    env.fleet.store.update(created.row.uuid, deleting=1)
    fields = await startup_error(env.proxy.port, {"user": "going", "database": "going"})
    assert fields["C"] == "57P03"
    env.fleet.store.update(created.row.uuid, deleting=0)


async def test_protocol_garbage_gets_08P01_and_the_proxy_lives_on(env):
    created = await env.fleet.create("shop")
    for garbage in (struct.pack("!i", 4), struct.pack("!ii", 12, 1234) + b"abcd", b"\x00\x00\x00\x09\x00\x03\x00\x00x"):
        reader, writer = await asyncio.open_connection("127.0.0.1", env.proxy.port)
        writer.write(garbage)
        writer.write_eof()
        data = await reader.read()
        writer.close()
        if data:
            assert data[:1] == b"E" and m.parse_error_fields(data[5:])["C"] == "08P01"
    async with await connect(env, "shop", created.password) as conn:
        assert await scalar(conn, "SELECT 1") == 1


async def test_ssl_request_is_declined_and_plain_text_goes_on(env):
    created = await env.fleet.create("shop")
    async with await connect(env, "shop", created.password, sslmode="prefer") as conn:
        assert await scalar(conn, "SELECT 1") == 1
    with pytest.raises(psycopg.OperationalError):
        await connect(env, "shop", created.password, sslmode="require")


async def test_startup_params_reach_the_backend(env):
    created = await env.fleet.create("shop")
    async with await connect(env, "shop", created.password, application_name="tour",
                             options="-c search_path=custom") as conn:
        assert await scalar(conn, "SHOW application_name") == "tour"
        assert await scalar(conn, "SHOW search_path") == "custom"


async def test_cancel_request_reaches_the_right_backend(env):
    created = await env.fleet.create("shop")
    async with await connect(env, "shop", created.password) as busy, \
            await connect(env, "shop", created.password) as other:
        task = asyncio.create_task(busy.execute("SELECT pg_sleep(30)"))
        # wait until the sleeping query is really running before cancelling it
        await until(lambda: scalar(other, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"),
                    what="the sleeping query to run")
        started = time.monotonic()
        await busy.cancel_safe()
        with pytest.raises(psycopg.errors.QueryCanceled):
            await task
        assert time.monotonic() - started < 10
        assert await scalar(other, "SELECT 1") == 1  # the other session is untouched


async def test_fifty_clients_on_standby_cause_exactly_one_start(env):
    created = await env.fleet.create("burst")
    await env.fleet.suspend("burst")
    before = env.fleet.get("burst").start_count

    async def client(i):
        async with await connect(env, "burst", created.password) as conn:
            return await scalar(conn, f"SELECT {i}")

    results = await asyncio.gather(*(client(i) for i in range(50)))
    assert sorted(results) == list(range(50))
    row = env.fleet.get("burst")
    assert row.start_count == before + 1
    assert row.state == State.RUNNING


async def test_scales_to_zero_after_cooldown_and_wakes_on_connect(env):
    created = await env.fleet.create("nap", cooldown_ms=200)
    async with await connect(env, "nap", created.password) as conn:
        await conn.execute("CREATE TABLE t AS SELECT 1 AS x")
    row = await env.fleet.wait_for("nap", lambda r: r.state == State.STANDBY, timeout_s=30)
    assert row.state == State.STANDBY and row.stop_reason == "idle"
    assert env.fleet.backend_of(row.uuid) is None
    async with await connect(env, "nap", created.password) as conn:
        assert await scalar(conn, "SELECT x FROM t") == 1
    assert env.fleet.get("nap").start_count == row.start_count + 1


async def test_never_suspended_while_a_client_is_connected(env):
    created = await env.fleet.create("busy", cooldown_ms=100)
    async with await connect(env, "busy", created.password) as conn:
        # many cooldowns pass with an idle but open session: it must stay running
        row = await env.fleet.wait_for("busy", lambda r: r.state != State.RUNNING, timeout_s=1.5)
        assert row.state == State.RUNNING
        assert await scalar(conn, "SELECT 1") == 1
    row = await env.fleet.wait_for("busy", lambda r: r.state == State.STANDBY, timeout_s=30)
    assert row.state == State.STANDBY


async def test_stopped_database_is_not_woken_by_a_connection(env):
    created = await env.fleet.create("held")
    await env.fleet.stop("held")
    with pytest.raises(psycopg.OperationalError, match="stopped"):
        await connect(env, "held", created.password)
    assert env.fleet.get("held").state == State.STOPPED
    await env.fleet.resume("held")
    async with await connect(env, "held", created.password) as conn:
        assert await scalar(conn, "SELECT 1") == 1


async def test_manual_suspend_waits_for_clients_then_data_is_intact(env):
    created = await env.fleet.create("manual")
    async with await connect(env, "manual", created.password) as conn:
        await conn.execute("CREATE TABLE t AS SELECT generate_series(1, 100) AS x")
    await env.fleet.suspend("manual")
    assert env.fleet.get("manual").state == State.STANDBY
    async with await connect(env, "manual", created.password) as conn:
        assert await scalar(conn, "SELECT sum(x) FROM t") == 5050


async def test_rotated_password(env):
    created = await env.fleet.create("rot")
    _, new = await env.fleet.rotate_password("rot")
    with pytest.raises(psycopg.OperationalError):
        await connect(env, "rot", created.password)
    async with await connect(env, "rot", new) as conn:
        assert await scalar(conn, "SELECT 1") == 1


async def test_startup_that_never_finishes_does_not_block_others(env):
    created = await env.fleet.create("shop")
    lingering = socket.create_connection(("127.0.0.1", env.proxy.port))
    lingering.sendall(b"\x00\x00")  # half a length word, then silence
    try:
        async with await connect(env, "shop", created.password) as conn:
            assert await scalar(conn, "SELECT 1") == 1
    finally:
        lingering.close()
