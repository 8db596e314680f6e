"""The pooled listener (transaction pooling), TLS and routing, limits, and idleness that
follows transactions. Real libpq clients against real Postgres."""

from __future__ import annotations

import asyncio
import os

import psycopg
import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgfleet.fleet.states import State
from pgfleet.proxy.client_state import ClientPhase
from pgfleet.proxy.server import ProxyServer
from pgfleet.proxy.tls import ensure_local_ca, server_context

from .conftest import startup_error
from .polling import until


@pytest.fixture
async def servers(env):
    """env (direct, plain) plus: pooled plain, direct TLS and pooled TLS listeners."""
    files = ensure_local_ca(env.home / "tls", "db.localhost", ["127.0.0.1"])
    tls = server_context(files)
    pooled = ProxyServer(env.fleet, "127.0.0.1", 0, mode="transaction")
    direct_tls = ProxyServer(env.fleet, "127.0.0.1", 0, mode="session", tls=tls, domain="db.localhost")
    pooled_tls = ProxyServer(env.fleet, "127.0.0.1", 0, mode="transaction", tls=tls, domain="db.localhost")
    for s in (pooled, direct_tls, pooled_tls):
        await s.start()
    env.fleet.on_delete.append(pooled.forget_database)
    env.fleet.on_delete.append(pooled_tls.forget_database)
    yield {"direct": env.proxy, "pooled": pooled, "direct_tls": direct_tls, "pooled_tls": pooled_tls,
           "ca": str(files.ca)}
    for s in (pooled, direct_tls, pooled_tls):
        await s.close()


def info(server, name, password, **kw):
    return dict(host="127.0.0.1", port=server.port, dbname=name, user=name, password=password,
                connect_timeout=30, **kw)


async def aconnect(server, name, password, **kw):
    return await psycopg.AsyncConnection.connect(**info(server, name, password, **kw), autocommit=True)


async def scalar(conn, sql, params=None, **kw):
    cur = await conn.execute(sql, params, **kw)
    return (await cur.fetchone())[0]


async def test_server_connections_are_shared_per_transaction(env, servers):
    created = await env.fleet.create("pool", pool_size=2)
    pooled = servers["pooled"]
    conns = [await aconnect(pooled, "pool", created.password) for _ in range(8)]
    try:
        assert await scalar(conns[0], "SELECT current_database()") == "pool"  # the URI's /pool
        pids = set()
        for _ in range(3):
            for c in conns:
                pids.add(await scalar(c, "SELECT pg_backend_pid()"))
        # 8 clients, 24 transactions, never more than 2 server connections
        assert 1 <= len(pids) <= 2
        assert len(servers["pooled"].pools[created.row.uuid].conns) <= 2
        # explicit transactions keep their server connection to the end
        c = conns[0]
        async with c.transaction():
            first = await scalar(c, "SELECT pg_backend_pid()")
            await conns[1].execute("SELECT 1")
            assert await scalar(c, "SELECT pg_backend_pid()") == first
    finally:
        for c in conns:
            await c.close()


async def test_concurrent_transactions_queue_for_a_small_pool(env, servers):
    created = await env.fleet.create("queue", pool_size=2)
    pooled = servers["pooled"]
    async with await aconnect(pooled, "queue", created.password) as c:
        await c.execute("CREATE TABLE t(i int)")

    async def worker(i):
        async with await aconnect(pooled, "queue", created.password) as c:
            for j in range(5):
                async with c.transaction():
                    await c.execute("INSERT INTO t VALUES (%s)", (i * 100 + j,))
                    await c.execute("SELECT pg_sleep(0.005)")

    await asyncio.gather(*(worker(i) for i in range(10)))
    async with await aconnect(pooled, "queue", created.password) as c:
        assert await scalar(c, "SELECT count(*) FROM t") == 50


async def test_named_prepared_statements_across_server_connections(env, servers):
    created = await env.fleet.create("prep", pool_size=3)
    pooled = servers["pooled"]
    clients = [await aconnect(pooled, "prep", created.password, prepare_threshold=0) for _ in range(6)]
    try:
        for round_ in range(5):
            for i, c in enumerate(clients):
                # prepare_threshold=0: psycopg prepares every statement with a name (Parse 'S'),
                # then Binds it by name in later transactions, wherever those land
                assert await scalar(c, "SELECT %s::int + %s::int", (i, round_)) == i + round_
                assert await scalar(c, "SELECT %s::text || 'x'", (str(i),)) == f"{i}x"
        stmts = [await scalar(c, "SELECT count(*) FROM pg_prepared_statements") for c in clients]
        assert all(n >= 1 for n in stmts)
    finally:
        for c in clients:
            await c.close()


async def test_prepared_statement_errors_and_pipeline(env, servers):
    created = await env.fleet.create("pipe", pool_size=2)
    async with await aconnect(servers["pooled"], "pipe", created.password, prepare_threshold=0) as c:
        await c.execute("CREATE TABLE t(i int PRIMARY KEY)")
        async with c.pipeline():
            for i in range(20):
                await c.execute("INSERT INTO t VALUES (%s)", (i,))
        assert await scalar(c, "SELECT count(*) FROM t") == 20
        with pytest.raises(psycopg.errors.UniqueViolation):
            await c.execute("INSERT INTO t VALUES (%s)", (1,))
        # after an error the session and its prepared statements still work
        await c.execute("INSERT INTO t VALUES (%s)", (100,))
        assert await scalar(c, "SELECT count(*) FROM t WHERE i > %s", (10,)) == 10
        with pytest.raises(psycopg.errors.DivisionByZero):
            async with c.pipeline():
                await c.execute("SELECT 1/0")
                await c.execute("SELECT %s::int", (2,))
        assert await scalar(c, "SELECT %s::int", (3,)) == 3


async def test_sql_errors_inside_transactions_roll_back_and_release(env, servers):
    created = await env.fleet.create("txerr", pool_size=1)
    a = await aconnect(servers["pooled"], "txerr", created.password)
    b = await aconnect(servers["pooled"], "txerr", created.password)
    try:
        with pytest.raises(psycopg.errors.UndefinedTable):
            async with a.transaction():
                await a.execute("SELECT * FROM nope")
        # the only server connection came back to the pool: b gets it
        assert await asyncio.wait_for(scalar(b, "SELECT 1"), 10) == 1
    finally:
        await a.close()
        await b.close()


async def test_client_leaving_mid_transaction_does_not_leak_its_transaction(env, servers):
    created = await env.fleet.create("leak", pool_size=1)
    a = await aconnect(servers["pooled"], "leak", created.password)
    await a.execute("CREATE TABLE t(i int)")
    await a.execute("BEGIN")
    await a.execute("INSERT INTO t VALUES (1)")
    await a.close()  # gone with a transaction open
    async with await aconnect(servers["pooled"], "leak", created.password) as b:
        assert await scalar(b, "SELECT count(*) FROM t") == 0
        assert await scalar(b, "SELECT now() = statement_timestamp()") is True  # not inside a's transaction


async def test_copy_through_the_pooler(env, servers):
    created = await env.fleet.create("copy")
    async with await aconnect(servers["pooled"], "copy", created.password) as c:
        await c.execute("CREATE TABLE t(i int, s text)")
        async with c.cursor().copy("COPY t FROM STDIN") as copy:
            for i in range(1000):
                await copy.write_row((i, f"row {i}"))
        assert await scalar(c, "SELECT count(*) FROM t") == 1000
        rows = []
        async with c.cursor().copy("COPY (SELECT i FROM t ORDER BY i LIMIT 3) TO STDOUT") as copy:
            async for row in copy.rows():
                rows.append(row)
        assert rows == [("0",), ("1",), ("2",)]


async def test_listen_notify_on_the_direct_listener(env, servers):
    created = await env.fleet.create("notif")
    listener = await aconnect(servers["direct"], "notif", created.password)
    sender = await aconnect(servers["direct"], "notif", created.password)
    try:
        await listener.execute("LISTEN ch")
        await sender.execute("NOTIFY ch, 'hello'")
        gen = listener.notifies(timeout=10)
        note = await anext(gen)
        assert note.channel == "ch" and note.payload == "hello"
    finally:
        await listener.close()
        await sender.close()


async def test_cancel_in_pooled_mode(env, servers):
    created = await env.fleet.create("pcancel")
    async with await aconnect(servers["pooled"], "pcancel", created.password) as c:
        task = asyncio.create_task(c.execute("SELECT pg_sleep(30)"))
        async with await aconnect(servers["direct"], "pcancel", created.password) as other:
            await until(lambda: scalar(other, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"),
                        what="the sleeping query to run")
        await c.cancel_safe()
        with pytest.raises(psycopg.errors.QueryCanceled):
            await task


async def test_limits_give_53300_and_count_listeners_apart(env, servers):
    created = await env.fleet.create("lim", max_direct_clients=2, max_pooled_clients=3)
    held = [await aconnect(servers["direct"], "lim", created.password) for _ in range(2)]
    held += [await aconnect(servers["pooled"], "lim", created.password) for _ in range(3)]
    try:
        for server in ("direct", "pooled"):
            with pytest.raises(psycopg.OperationalError, match="too many"):
                await aconnect(servers[server], "lim", created.password)
            # (limits count authenticated sessions: a bare startup packet is not refused, nor
            # does it take a slot: tests/security/test_preauth.py)
    finally:
        for c in held:
            await c.close()
    async with await aconnect(servers["direct"], "lim", created.password) as c:  # freed again
        assert await scalar(c, "SELECT 1") == 1


@pytest.mark.parametrize("listener", ["direct_tls", "pooled_tls"])
async def test_tls_verify_full_and_sni_routing(env, servers, listener):
    created = await env.fleet.create("secure")
    server = servers[listener]
    # SNI: the database name comes from the host name, so the client may say "postgres"
    conn = await psycopg.AsyncConnection.connect(
        host="secure.db.localhost", hostaddr="127.0.0.1", port=server.port, dbname="postgres", user="secure",
        password=created.password, sslmode="verify-full", sslrootcert=servers["ca"], autocommit=True)
    async with conn:
        assert await scalar(conn, "SELECT current_user") == "secure"
        assert await scalar(conn, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is False  # TLS ends at the proxy
    # verify-full against localhost/127.0.0.1 works too
    async with await aconnect(server, "secure", created.password, sslmode="verify-full",
                              sslrootcert=servers["ca"]) as c:
        assert await scalar(c, "SELECT 1") == 1


async def test_endpoint_option_routing_and_unknown_targets(env, servers):
    created = await env.fleet.create("ep")
    conn = await psycopg.AsyncConnection.connect(**{**info(servers["direct"], "ep", created.password),
                                                   "dbname": "postgres", "options": "endpoint=ep"}, autocommit=True)
    async with conn:
        assert await scalar(conn, "SELECT current_user") == "ep"
    with pytest.raises(psycopg.OperationalError) as exc:
        await psycopg.AsyncConnection.connect(**{**info(servers["direct"], "ep", created.password),
                                                "options": "endpoint=nope"})
    assert 'database "nope" does not exist' in str(exc.value)
    fields = await startup_error(servers["direct"].port, {"user": "ep", "database": "postgres",
                                                          "options": "endpoint=nope"})
    assert fields["C"] == "3D000"
    with pytest.raises(psycopg.OperationalError, match='database "nope" does not exist'):
        await psycopg.AsyncConnection.connect(
            host="nope.db.localhost", hostaddr="127.0.0.1", port=servers["direct_tls"].port, dbname="postgres",
            user="ep", password=created.password, sslmode="verify-full", sslrootcert=servers["ca"])


async def test_require_tls_refuses_plain_text(env, servers):
    created = await env.fleet.create("strict", require_tls=True)
    with pytest.raises(psycopg.OperationalError, match="requires an encrypted connection"):
        await aconnect(servers["direct_tls"], "strict", created.password, sslmode="disable")
    fields = await startup_error(servers["direct_tls"].port, {"user": "strict", "database": "strict"})
    assert fields["C"] == "28000"
    async with await aconnect(servers["direct_tls"], "strict", created.password, sslmode="require") as c:
        assert await scalar(c, "SELECT 1") == 1


@pytest.mark.parametrize("listener", ["direct", "pooled"])
async def test_never_scaled_to_zero_mid_transaction(env, servers, listener):
    created = await env.fleet.create("midtx", cooldown_ms=100)
    c = await aconnect(servers[listener], "midtx", created.password)
    try:
        await c.execute("BEGIN")
        await c.execute("CREATE TABLE t AS SELECT 1 AS x")
        rt = env.fleet.rt[created.row.uuid]
        assert rt.busy == 1
        row = await env.fleet.wait_for("midtx", lambda r: r.state != State.RUNNING, timeout_s=1.0)
        assert row.state == State.RUNNING
        await c.execute("COMMIT")
        # on a driver that cannot keep sessions across a suspend the open session alone keeps
        # the database up: it counts as busy for its whole life (no per-transaction tracking)
        assert rt.busy == 1
    finally:
        await c.close()
    row = await env.fleet.wait_for("midtx", lambda r: r.state == State.STANDBY, timeout_s=30)
    assert row.state == State.STANDBY


@pytest.mark.parametrize("listener", ["direct", "pooled"])
async def test_sessions_are_tracked_per_transaction_where_sessions_survive_suspend(env, servers, monkeypatch,
                                                                                 listener):
    """Where a driver keeps sessions across a suspend (microVM; the sandbox's warm standby)
    and the policy is `idle`, both listeners read the transaction state: busy inside a
    transaction only."""
    monkeypatch.setattr(env.fleet.driver, "keeps_sessions_across_suspend", True)
    created = await env.fleet.create("tracked", policy="idle")
    c = await aconnect(servers[listener], "tracked", created.password)
    try:
        rt = env.fleet.rt[created.row.uuid]
        assert rt.busy == 0
        await c.execute("BEGIN")
        assert rt.busy == 1
        assert await scalar(c, "SELECT count(*) FROM generate_series(1, 1000)") == 1000
        await c.execute("COMMIT")
        assert rt.busy == 0
    finally:
        await c.close()


async def test_idle_policy_needs_a_driver_that_keeps_sessions(env, monkeypatch):
    from pgfleet.fleet.errors import InvalidRequest

    # the sandbox keeps them where it can freeze (warm standby): pretend it cannot
    monkeypatch.setattr(env.fleet.driver, "keeps_sessions_across_suspend", False)
    with pytest.raises(InvalidRequest, match="idle"):
        await env.fleet.create("idler", policy="idle")
    assert env.fleet.find("idler") is None


async def test_wake_through_the_pooler(env, servers):
    created = await env.fleet.create("pwake")
    await env.fleet.suspend("pwake")
    results = await asyncio.gather(*(
        _one(servers["pooled"], "pwake", created.password, i) for i in range(20)))
    assert sorted(results) == list(range(20))
    assert env.fleet.get("pwake").state == State.RUNNING


async def _one(server, name, password, i):
    async with await aconnect(server, name, password) as c:
        return await scalar(c, "SELECT %s::int", (i,))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.binary(min_size=0, max_size=64), min_size=1, max_size=6))
def test_hostile_bytes_after_auth_never_break_the_pooler(hostile_env, chunks):
    """Random bytes from an authenticated client: its session may end, the proxy serves on."""
    loop, env, servers, password = hostile_env

    async def attack_then_query():
        for listener in ("pooled", "direct"):
            conn = await aconnect(servers[listener], "fuzz", password)
            sock_fd = conn.pgconn.socket
            for chunk in chunks:
                try:
                    os.write(sock_fd, chunk)
                except OSError:
                    break
            await conn.close()
        async with await aconnect(servers["pooled"], "fuzz", password) as c:
            assert await scalar(c, "SELECT 1") == 1

    loop.run_until_complete(asyncio.wait_for(attack_then_query(), 60))


@pytest.fixture(scope="module")
def hostile_env():
    """A module-scoped fleet for the fuzz test (hypothesis calls the test many times)."""
    from .conftest import fleet_on_own_loop

    with fleet_on_own_loop("pgfleet-fuzz-") as (loop, fleet):
        async def setup():
            servers = {"pooled": ProxyServer(fleet, "127.0.0.1", 0, mode="transaction"),
                       "direct": ProxyServer(fleet, "127.0.0.1", 0)}
            for s in servers.values():
                await s.start()
            created = await fleet.create("fuzz", pool_size=2)
            return servers, created.password

        servers, password = loop.run_until_complete(setup())
        yield loop, None, servers, password

        async def teardown():
            for s in servers.values():
                await s.close()
            await fleet.delete("fuzz")

        loop.run_until_complete(teardown())


async def test_sql_deallocate_keeps_statement_maps_true(env, servers):
    """psycopg sends DEALLOCATE ALL after DROP/ROLLBACK; other clients' statements on the
    same server connection must be re-prepared, not assumed."""
    created = await env.fleet.create("dealloc", pool_size=1)
    a = await aconnect(servers["pooled"], "dealloc", created.password, prepare_threshold=0)
    b = await aconnect(servers["pooled"], "dealloc", created.password, prepare_threshold=0)
    try:
        assert await scalar(a, "SELECT %s::int * 10", (1,)) == 10
        assert await scalar(b, "SELECT %s::int * 10", (2,)) == 20
        for sql_text in ("DEALLOCATE ALL", "discard all", "  DEALLOCATE ALL ;"):
            await b.execute(sql_text)
            assert await scalar(a, "SELECT %s::int * 10", (3,)) == 30
            assert await scalar(b, "SELECT %s::int * 10", (4,)) == 40
        # SQL-level PREPARE/EXECUTE/DEALLOCATE by name of a client's own SQL statement
        await a.execute("PREPARE plus(int) AS SELECT $1 + 1")
        assert await scalar(a, "EXECUTE plus(1)") == 2
        await a.execute("DEALLOCATE plus")
    finally:
        await a.close()
        await b.close()


async def test_a_client_that_leaves_while_queued_for_the_pool_gets_nothing(env, servers):
    """With every server connection in use, a client waits in the pool's queue; if it leaves,
    the connection released next goes to the next client, not to the one that left."""
    created = await env.fleet.create("queued", pool_size=1)
    holder = await aconnect(servers["pooled"], "queued", created.password)
    await holder.execute("BEGIN")
    await holder.execute("SELECT 1")
    pool = servers["pooled"].pools[created.row.uuid]
    leaver = await aconnect(servers["pooled"], "queued", created.password)
    pending = asyncio.ensure_future(leaver.execute("SELECT 2"))
    await until(lambda: any(c.phase is ClientPhase.WAITING for c in pool.queued), what="the proxy to queue the client")
    leaver.pgconn.finish()  # gone without a word, mid-wait
    with pytest.raises(psycopg.Error):
        await pending
    await holder.execute("COMMIT")
    after = await aconnect(servers["pooled"], "queued", created.password)
    try:
        assert await scalar(after, "SELECT 3") == 3
        assert len(pool.conns) == 1 and not any(c.phase is ClientPhase.WAITING for c in pool.queued)
    finally:
        await after.close()
        await holder.close()
