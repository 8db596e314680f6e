"""Session parameters on the pooled listener: every client keeps its own (startup packet,
options, its own SETs), whichever server connection it lands on, and nothing one client
sets reaches another. Real libpq clients, real Postgres, pools of one server connection so
that every client shares it."""

from __future__ import annotations

import asyncio

from datetime import datetime, timezone

import psycopg
import pytest

from .polling import until


async def connect(server, name, password, **kw):
    return await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=server.port, dbname=name, user=name, password=password, connect_timeout=30,
        autocommit=True, **kw)


async def row(conn, sql, params=None):
    cur = await conn.execute(sql, params)
    return await cur.fetchone()


SETTINGS = "SELECT current_setting('application_name'), current_setting('TimeZone'), " \
           "current_setting('search_path'), (SELECT v FROM t), pg_backend_pid()"


async def _two_schemas(server, name, password):
    """Schemas a and b, each with a table t saying which it is: search_path decides."""
    async with await connect(server, name, password) as c:
        for s in ("a", "b"):
            await c.execute(f"CREATE SCHEMA {s}")
            await c.execute(f"CREATE TABLE {s}.t AS SELECT '{s}'::text AS v")


async def test_each_client_has_its_own_startup_parameters_on_a_shared_connection(env, pooled):
    created = await env.fleet.create("own", pool_size=1)
    await _two_schemas(pooled, "own", created.password)
    a = await connect(pooled, "own", created.password, application_name="alpha",
                      options="-c TimeZone=Asia/Tokyo -c search_path=a")
    b = await connect(pooled, "own", created.password, application_name="beta",
                      options="-c timezone=America/New_York --search-path=b")
    try:
        # the startup ParameterStatus are each client's own
        assert a.info.parameter_status("application_name") == "alpha"
        assert a.info.parameter_status("TimeZone") == "Asia/Tokyo"
        assert b.info.parameter_status("application_name") == "beta"
        assert b.info.parameter_status("TimeZone") == "America/New_York"
        pids = set()
        for _ in range(3):  # interleaved, on the pool's only server connection
            *values, pid = await row(a, SETTINGS)
            assert values == ["alpha", "Asia/Tokyo", "a", "a"]
            pids.add(pid)
            *values, pid = await row(b, SETTINGS)
            assert values == ["beta", "America/New_York", "b", "b"]
            pids.add(pid)
            async with a.transaction():  # explicit transactions too
                assert (await row(a, "SHOW TimeZone"))[0] == "Asia/Tokyo"
                assert (await row(a, "SELECT v FROM t"))[0] == "a"
            async with b.transaction():
                assert (await row(b, "SHOW search_path"))[0] == "b"
        assert len(pids) == 1
        # the driver itself relies on them: timestamptz come back in the session's time zone
        ts = (await row(a, "SELECT '2024-01-01 00:00:00+00'::timestamptz"))[0]
        assert ts == datetime(2024, 1, 1, tzinfo=timezone.utc) and ts.utcoffset().total_seconds() == 9 * 3600
        ts = (await row(b, "SELECT '2024-01-01 00:00:00+00'::timestamptz"))[0]
        assert ts.utcoffset().total_seconds() == -5 * 3600
    finally:
        await a.close()
        await b.close()


async def test_a_set_follows_its_client_and_leaks_to_no_other(env, pooled):
    created = await env.fleet.create("noleak", pool_size=1)
    await _two_schemas(pooled, "noleak", created.password)
    a = await connect(pooled, "noleak", created.password, application_name="alpha")
    b = await connect(pooled, "noleak", created.password, application_name="beta")
    try:
        default = await row(b, SETTINGS[:-len(", pg_backend_pid()")].replace(", (SELECT v FROM t)", ""))
        # reported parameters (ParameterStatus) and unreported ones (search_path, custom)
        await a.execute("SET TimeZone = 'Europe/Paris'")
        await a.execute("SET application_name = 'alpha2'")
        await a.execute("SET search_path = b, public")
        await a.execute("SET myapp.tenant = '42'")
        await a.execute("set extra_float_digits to 0")
        assert a.info.parameter_status("TimeZone") == "Europe/Paris"  # forwarded to its client
        for _ in range(2):
            got = await row(b, "SELECT current_setting('application_name'), current_setting('TimeZone'), "
                               "current_setting('search_path'), current_setting('myapp.tenant', true), "
                               "current_setting('extra_float_digits')")
            assert got[:3] == default and got[3] in (None, "") and got[4] == "1"
            assert b.info.parameter_status("TimeZone") == default[1]
            got = await row(a, "SELECT current_setting('application_name'), current_setting('TimeZone'), "
                               "current_setting('search_path'), current_setting('myapp.tenant'), "
                               "current_setting('extra_float_digits'), (SELECT v FROM t)")
            assert got == ("alpha2", "Europe/Paris", "b, public", "42", "0", "b")
        # SET LOCAL lasts for its transaction only
        async with b.transaction():
            await b.execute("SET LOCAL TimeZone = 'Asia/Kolkata'")
            assert (await row(b, "SHOW TimeZone"))[0] == "Asia/Kolkata"
        assert (await row(b, "SHOW TimeZone"))[0] == default[1]
        # the extended protocol, a prepared SET executed again in a later transaction
        await b.execute("SET search_path = a", prepare=True)
        assert (await row(b, "SELECT v FROM t"))[0] == "a"
        assert (await row(a, "SELECT v FROM t"))[0] == "b"
        await b.execute("SET search_path = b")
        await b.execute("SET search_path = a", prepare=True)
        assert (await row(a, "SELECT v FROM t"))[0] == "b"
        assert (await row(b, "SELECT v FROM t"))[0] == "a"
        # RESET ALL goes back to the defaults, for its own client only
        await a.execute("RESET ALL")
        got = await row(a, "SELECT current_setting('TimeZone'), current_setting('search_path'), "
                           "current_setting('extra_float_digits')")
        assert got == (default[1], default[2], "1")
        assert (await row(b, "SELECT v FROM t"))[0] == "a"
    finally:
        await a.close()
        await b.close()
    # the server connection a client leaves goes on with the next client's values
    async with await connect(pooled, "noleak", created.password) as c:
        got = await row(c, "SELECT current_setting('TimeZone'), current_setting('search_path'), "
                           "current_setting('extra_float_digits'), current_setting('myapp.tenant', true)")
        assert got[:3] == (default[1], default[2], "1") and got[3] in (None, "")


async def test_same_parameters_cost_no_extra_query(env, pooled):
    """The common case: clients with the same parameters share a connection with no
    parameter Query per transaction; one is sent only when the values differ."""
    created = await env.fleet.create("fast", pool_size=1)
    same = [await connect(pooled, "fast", created.password, application_name="app",
                          options="-c search_path=public") for _ in range(3)]
    other = await connect(pooled, "fast", created.password, application_name="other")
    pool = pooled.pools[created.row.uuid]
    try:
        await row(same[0], "SELECT 1")
        before = pool.syncs
        for _ in range(5):
            for c in same:
                assert (await row(c, "SELECT current_setting('application_name')"))[0] == "app"
        assert pool.syncs == before
        for _ in range(3):
            assert (await row(other, "SELECT current_setting('application_name')"))[0] == "other"
            assert (await row(same[1], "SELECT current_setting('application_name')"))[0] == "app"
        assert pool.syncs == before + 6
    finally:
        for c in (*same, other):
            await c.close()


async def test_startup_values_the_server_refuses_get_its_error(env, pooled):
    created = await env.fleet.create("refuse", pool_size=1)
    with pytest.raises(psycopg.OperationalError, match='invalid value for parameter "client_encoding": "nonsense"'):
        await connect(pooled, "refuse", created.password, client_encoding="nonsense")
    with pytest.raises(psycopg.OperationalError, match='unrecognized configuration parameter "no_such_setting"'):
        await connect(pooled, "refuse", created.password, options="-c no_such_setting=1")
    with pytest.raises(psycopg.OperationalError, match="invalid value for parameter \"TimeZone\""):
        await connect(pooled, "refuse", created.password, options="-c TimeZone=Mars/Olympus")
    with pytest.raises(psycopg.OperationalError, match="only -c name=value"):
        await connect(pooled, "refuse", created.password, options="-B 100")
    # the pool's server connection lives on, unchanged
    async with await connect(pooled, "refuse", created.password, client_encoding="LATIN1") as c:
        assert c.info.parameter_status("client_encoding") == "LATIN1"
        assert (await row(c, "SELECT 'é'::text, current_setting('client_encoding')")) == ("é", "LATIN1")
    async with await connect(pooled, "refuse", created.password) as c:
        assert (await row(c, "SHOW client_encoding"))[0] == "UTF8"
        assert (await row(c, "SELECT 'é'::text"))[0] == "é"


async def test_non_ascii_values_and_encodings(env, pooled):
    """A value outside ASCII set on a connection whose client_encoding is not UTF-8."""
    created = await env.fleet.create("enc", pool_size=1)
    async with await connect(pooled, "enc", created.password) as c:
        await c.execute('CREATE SCHEMA "schéma"')
        await c.execute("""CREATE TABLE "schéma".t AS SELECT 'accents'::text AS v""")
    latin = await connect(pooled, "enc", created.password, client_encoding="LATIN1")
    utf = await connect(pooled, "enc", created.password, options="-c search_path=schéma")
    try:
        for _ in range(2):
            assert (await row(latin, "SHOW client_encoding"))[0] == "LATIN1"
            assert (await row(utf, "SELECT current_setting('search_path'), (SELECT v FROM t)")) == (
                "schéma", "accents")
            assert (await row(utf, "SHOW client_encoding"))[0] == "UTF8"
    finally:
        await latin.close()
        await utf.close()


async def test_values_a_connection_can_no_longer_take_end_that_session_only(env, pooled):
    """A value valid at startup that the server refuses later (the text search configuration
    it names was dropped): its client gets the server's reason and its session ends; the
    server connection is not reused with unknown values; other clients go on."""
    created = await env.fleet.create("gone", pool_size=1)
    async with await connect(pooled, "gone", created.password) as c:
        await c.execute("CREATE TEXT SEARCH CONFIGURATION public.mine (COPY = english)")
    a = await connect(pooled, "gone", created.password, options="-c default_text_search_config=public.mine")
    b = await connect(pooled, "gone", created.password)
    try:
        assert (await row(a, "SHOW default_text_search_config"))[0] == "public.mine"
        first_pid = (await row(b, "SELECT pg_backend_pid()"))[0]
        await b.execute("DROP TEXT SEARCH CONFIGURATION public.mine")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="could not give a server connection this "
                           "session's parameters: invalid value for parameter \"default_text_search_config\""):
            await a.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):  # FATAL: its session is over
            await a.execute("SELECT 1")
        got = await row(b, "SELECT current_setting('default_text_search_config'), pg_backend_pid()")
        assert got[0] == "pg_catalog.english" and got[1] != first_pid
    finally:
        await a.close()
        await b.close()


async def test_a_client_leaving_right_after_a_set_leaves_a_reusable_connection(env, pooled):
    """The question the proxy asks after a SET of an unreported parameter is answered even if
    the client has gone meanwhile: the connection goes back to the pool with known values."""
    created = await env.fleet.create("leave", pool_size=1)
    await _two_schemas(pooled, "leave", created.password)
    pids = set()
    for schema in ("a", "b", "a"):
        async with await connect(pooled, "leave", created.password) as c:
            await c.execute(f"SET search_path = {schema}")
            got = await row(c, "SELECT v, pg_backend_pid() FROM t")
            assert got[0] == schema
            pids.add(got[1])
            await c.execute(f"SET search_path = {schema}, public")  # its last statement: it leaves at once
        async with await connect(pooled, "leave", created.password) as c:
            got = await row(c, "SELECT current_setting('search_path'), pg_backend_pid()")
            assert got[0] == '"$user", public'
            pids.add(got[1])
    assert len(pids) == 1  # never discarded
    rt = env.fleet.rt[created.row.uuid]
    await until(lambda: rt.clients == 0, what="the proxy to see the last client go")
    assert rt.busy == 0




async def test_a_new_application_name_costs_no_server_connection_at_connect(env, pooled):
    """Clients that name every connection differently connect while the only server
    connection is busy in another client's transaction, and each sees its own name, cleaned
    as Postgres 15 cleans it (bytes outside printable ASCII become '?')."""
    created = await env.fleet.create("names", pool_size=1)
    holder = await connect(pooled, "names", created.password)
    await holder.execute("BEGIN")
    await holder.execute("SELECT 1")  # the pool's one server connection is now held
    try:
        names = [f"worker-{i}" for i in range(5)] + ["café"]
        clients = await asyncio.wait_for(asyncio.gather(*(
            connect(pooled, "names", created.password, application_name=n) for n in names)), timeout=10)
    finally:
        await holder.execute("COMMIT")
        await holder.close()
    try:
        seen = [(await row(c, "SELECT current_setting('application_name')"))[0] for c in clients]
        assert seen == [f"worker-{i}" for i in range(5)] + ["caf??"]
        async with await connect(env.proxy, "names", created.password, application_name="café") as direct:
            assert (await row(direct, "SELECT current_setting('application_name')"))[0] == seen[-1]  # as Postgres
        assert [c.info.parameter_status("application_name") for c in clients] == seen
    finally:
        for c in clients:
            await c.close()
