"""asyncpg through both listeners. asyncpg prepares every statement (named, cached per
connection) by default: these are the statements a transaction pooler must carry over."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import uuid

import asyncpg
import pytest

pytestmark = pytest.mark.timeout(120)  # a hung proxy fails a test, not the suite


async def connect(target, **kw) -> asyncpg.Connection:
    ssl = target.ssl_context()
    return await asyncpg.connect(host=target.host, port=target.port, user=target.user, password=target.password,
                                 database=target.dbname, ssl=ssl, timeout=30, **kw)


async def test_fetch_with_parameters(target):
    conn = await connect(target)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT current_user") == target.user
        row = await conn.fetchrow("SELECT $1::int + $2::int AS s, $3::text AS t", 40, 2, "x")
        assert (row["s"], row["t"]) == (42, "x")
        # the statement cache: the same query many times reuses one named prepared statement
        for i in range(50):
            assert await conn.fetchval("SELECT $1::int * 3", i) == 3 * i
    finally:
        await conn.close()


async def test_explicit_prepared_statement(target):
    conn = await connect(target)
    try:
        stmt = await conn.prepare("SELECT $1::int + 1 AS n, $2::text AS t")
        assert [a.name for a in stmt.get_attributes()] == ["n", "t"]
        for i in range(30):
            assert tuple(await stmt.fetchrow(i, str(i))) == (i + 1, str(i))
        assert await stmt.fetchval(41, "x") == 42
        # with a transaction between uses
        async with conn.transaction():
            assert await stmt.fetchval(1, "y") == 2
        assert await stmt.fetchval(2, "z") == 3
    finally:
        await conn.close()


async def test_types(target, table):
    conn = await connect(target)
    try:
        await conn.execute(f'DROP TABLE IF EXISTS "{table}"')
        await conn.execute(f'CREATE TABLE "{table}" (id uuid PRIMARY KEY, at timestamptz, d date, n numeric, '
                           f'tags text[], blob bytea, doc jsonb, f float8)')
        u = uuid.uuid4()
        at = dt.datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=dt.timezone.utc)
        vals = (u, at, dt.date(2000, 1, 1), decimal.Decimal("3.14159265358979323846"), ["a", "b"],
                b"\x00\x01\xff", '{"k": [1, 2]}', 1.5)
        await conn.execute(f'INSERT INTO "{table}" VALUES ($1, $2, $3, $4, $5, $6, $7, $8)', *vals)
        row = await conn.fetchrow(f'SELECT * FROM "{table}" WHERE id = $1', u)
        assert tuple(row) == vals
        await conn.execute(f'DROP TABLE "{table}"')
    finally:
        await conn.close()


async def test_transactions(target, table):
    conn = await connect(target)
    try:
        await conn.execute(f'DROP TABLE IF EXISTS "{table}"')
        await conn.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY)')
        async with conn.transaction():
            await conn.execute(f'INSERT INTO "{table}" VALUES (1)')
        with pytest.raises(asyncpg.UniqueViolationError):
            async with conn.transaction():
                await conn.execute(f'INSERT INTO "{table}" VALUES (2)')
                await conn.execute(f'INSERT INTO "{table}" VALUES (1)')
        async with conn.transaction():
            await conn.execute(f'INSERT INTO "{table}" VALUES (3)')
            with pytest.raises(asyncpg.UniqueViolationError):
                async with conn.transaction():  # a savepoint
                    await conn.execute(f'INSERT INTO "{table}" VALUES (1)')
        assert [r["id"] for r in await conn.fetch(f'SELECT id FROM "{table}" ORDER BY id')] == [1, 3]
        await conn.execute(f'DROP TABLE "{table}"')
    finally:
        await conn.close()


async def test_executemany_and_copy(target, table):
    conn = await connect(target)
    try:
        await conn.execute(f'DROP TABLE IF EXISTS "{table}"')
        await conn.execute(f'CREATE TABLE "{table}" (id int, v text)')
        await conn.executemany(f'INSERT INTO "{table}" VALUES ($1, $2)', [(i, f"v{i}") for i in range(500)])
        await conn.copy_records_to_table(table, records=[(i, f"c{i}") for i in range(500, 3000)])
        assert await conn.fetchval(f'SELECT count(*) FROM "{table}"') == 3000
        assert await conn.fetchval(f'SELECT v FROM "{table}" WHERE id = $1', 2999) == "c2999"
        await conn.execute(f'DROP TABLE "{table}"')
    finally:
        await conn.close()


async def test_cursor_in_transaction(target):
    conn = await connect(target)
    try:
        async with conn.transaction():
            n = 0
            async for rec in conn.cursor("SELECT g FROM generate_series(1, 1000) g", prefetch=50):
                n += rec["g"]
        assert n == sum(range(1, 1001))
    finally:
        await conn.close()


async def test_errors_then_recovery(target):
    conn = await connect(target)
    try:
        with pytest.raises(asyncpg.DivisionByZeroError):
            await conn.fetchval("SELECT 1 / $1::int", 0)
        with pytest.raises(asyncpg.UndefinedTableError):
            await conn.fetch("SELECT * FROM no_such_table_here")
        assert await conn.fetchval("SELECT 1 / $1::int", 1) == 1
    finally:
        await conn.close()


async def test_pool(target):
    ssl = target.ssl_context()
    pool = await asyncpg.create_pool(host=target.host, port=target.port, user=target.user, password=target.password,
                                     database=target.dbname, ssl=ssl, min_size=2, max_size=5, timeout=30)
    try:
        async def work(i: int) -> int:
            async with pool.acquire() as conn:
                return await conn.fetchval("SELECT $1::int * $1::int", i)

        assert await asyncio.gather(*(work(i) for i in range(100))) == [i * i for i in range(100)]
    finally:
        await pool.close()


async def test_cancel_by_timeout(target):
    conn = await connect(target)
    try:
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetchval("SELECT pg_sleep(30)", timeout=0.5)
        assert await conn.fetchval("SELECT 2") == 2  # the query was cancelled on the server
    finally:
        await conn.close()


async def test_server_settings(target):
    """asyncpg sends server_settings as startup parameters: they are the session's, in every
    transaction (on the pooled listener, whichever server connection it lands on), and a
    SET lasts for the session."""
    conn = await connect(target, server_settings={"application_name": "compat-asyncpg", "TimeZone": "Asia/Tokyo",
                                                  "search_path": "pg_catalog, public", "statement_timeout": "54321"})
    try:
        assert conn.get_settings().application_name == "compat-asyncpg"
        assert conn.get_settings().TimeZone == "Asia/Tokyo"
        for _ in range(5):
            row = await conn.fetchrow("SELECT current_setting('application_name') AS a, current_setting('TimeZone') AS z, "
                                      "current_setting('search_path') AS s, current_setting('statement_timeout') AS t")
            assert tuple(row) == ("compat-asyncpg", "Asia/Tokyo", "pg_catalog, public", "54321ms")
        at = await conn.fetchval("SELECT '2024-01-01 12:00:00'::timestamp::timestamptz")
        assert at == dt.datetime(2024, 1, 1, 3, 0, tzinfo=dt.timezone.utc)
        await conn.execute("SET TimeZone = 'Europe/Lisbon'")
        for _ in range(3):
            assert await conn.fetchval("SHOW TimeZone") == "Europe/Lisbon"
        assert conn.get_settings().TimeZone == "Europe/Lisbon"
    finally:
        await conn.close()
