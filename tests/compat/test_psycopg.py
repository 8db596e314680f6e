"""psycopg 3 (libpq) through both listeners: extended protocol, prepared statements,
pipeline mode, COPY, server-side cursors, transactions, cancel."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timezone
from decimal import Decimal

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.types.json import Jsonb

pytestmark = pytest.mark.timeout(120)  # a hung proxy fails a test, not the suite


def connect(target, **kw) -> psycopg.Connection:
    return psycopg.connect(**target.conninfo(), **kw)


def test_simple_and_parameterised(target):
    with connect(target, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.pgconn.ssl_in_use == target.tls
        assert conn.execute("SELECT current_user, current_database() <> ''").fetchone() == (target.user, True)
        row = conn.execute("SELECT %s::int + %s::int, %s::text || 'b', %s::numeric * 2",
                           (40, 2, "a", Decimal("1.25"))).fetchone()
        assert row == (42, "ab", Decimal("2.50"))
        # several statements in one simple Query message
        cur = conn.cursor()
        cur.execute("SELECT 1; SELECT 2")
        assert cur.fetchone() == (1,)
        assert cur.nextset() and cur.fetchone() == (2,)


def test_types_roundtrip(target, table):
    u = uuid.uuid4()
    ts = datetime(2024, 2, 29, 12, 34, 56, 789000, tzinfo=timezone.utc)
    with connect(target, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
        conn.execute(sql.SQL("CREATE TABLE {} (id uuid PRIMARY KEY, at timestamptz, doc jsonb, tags text[], "
                             "blob bytea, n numeric)").format(sql.Identifier(table)))
        conn.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s)").format(sql.Identifier(table)),
                     (u, ts, Jsonb({"k": [1, "two", None]}), ["a", "b c", "é"], b"\x00\xff" * 1000,
                      Decimal("12345678901234567890.123")))
        for binary in (False, True):
            row = conn.cursor(binary=binary).execute(
                sql.SQL("SELECT id, at, doc, tags, blob, n FROM {} WHERE id = %s").format(sql.Identifier(table)),
                (u,)).fetchone()
            assert row == (u, ts, {"k": [1, "two", None]}, ["a", "b c", "é"], b"\x00\xff" * 1000,
                           Decimal("12345678901234567890.123"))
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(table)))


def test_transactions(target, table):
    ident = sql.Identifier(table)
    with connect(target) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text)").format(ident))
        conn.commit()
        with conn.transaction():
            conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'kept')").format(ident))
        with pytest.raises(RuntimeError):
            with conn.transaction():
                conn.execute(sql.SQL("INSERT INTO {} VALUES (2, 'rolled back')").format(ident))
                raise RuntimeError("roll back")
        # a failed statement aborts the transaction until rollback
        with pytest.raises(errors.UniqueViolation):
            conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'dup')").format(ident))
        with pytest.raises(errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        # savepoints
        with conn.transaction():
            conn.execute(sql.SQL("INSERT INTO {} VALUES (3, 'outer')").format(ident))
            with pytest.raises(errors.UniqueViolation):
                with conn.transaction():
                    conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'dup')").format(ident))
        rows = conn.execute(sql.SQL("SELECT id, v FROM {} ORDER BY id").format(ident)).fetchall()
        assert rows == [(1, "kept"), (3, "outer")]
        conn.execute(sql.SQL("DROP TABLE {}").format(ident))
        conn.commit()


def test_prepare_true(target):
    """Named prepared statements (Parse with a name once, then Bind/Execute), statement by statement."""
    with connect(target, autocommit=True) as conn:
        for i in range(20):
            assert conn.execute("SELECT %s::int * 2, %s::text", (i, f"v{i}"), prepare=True).fetchone() == (2 * i, f"v{i}")
        # really prepared on the server (a pooler may name it its own way there)
        prepared = conn.execute("SELECT name, statement FROM pg_prepared_statements").fetchall()
        assert any("$1::int * 2" in stmt for _, stmt in prepared), prepared


def test_prepared_across_transactions(target, table):
    """Every statement prepared (prepare_threshold=0), used across many transactions: under
    transaction pooling each may land on a different server connection."""
    ident = sql.Identifier(table)
    with connect(target, prepare_threshold=0) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, n int)").format(ident))
        conn.commit()
        for i in range(30):
            with conn.transaction():
                conn.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(ident), (i, i * i))
                assert conn.execute(sql.SQL("SELECT n FROM {} WHERE id = %s").format(ident), (i,)).fetchone() == (i * i,)
        assert conn.execute(sql.SQL("SELECT count(*), sum(n) FROM {}").format(ident)).fetchone() == (
            30, sum(i * i for i in range(30)))
        conn.execute(sql.SQL("DROP TABLE {}").format(ident))
        conn.commit()


def test_explicit_prepare_execute(target):
    """SQL-level PREPARE/EXECUTE inside one transaction."""
    with connect(target) as conn:
        with conn.transaction():
            conn.execute("PREPARE add2(int, int) AS SELECT $1 + $2")
            assert conn.execute("EXECUTE add2(2, 3)").fetchone() == (5,)
            conn.execute("DEALLOCATE add2")


def test_pipeline_mode(target, table):
    ident = sql.Identifier(table)
    with connect(target, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text)").format(ident))
        with conn.pipeline() as p:
            cur = conn.cursor()
            cur.executemany(sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(ident),
                            [(i, f"row {i}") for i in range(200)])
            curs = [conn.execute("SELECT %s::int * 10", (i,)) for i in range(50)]
            p.sync()
            assert [c.fetchone()[0] for c in curs] == [i * 10 for i in range(50)]
            count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident))
        assert count.fetchone() == (200,)
        # an error inside a pipeline aborts the rest of its batch; the connection goes on
        with pytest.raises(errors.UniqueViolation):
            with conn.pipeline():
                conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'dup')").format(ident))
                conn.execute(sql.SQL("INSERT INTO {} VALUES (1000, 'skipped')").format(ident))
        assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone() == (200,)
        # pipeline with prepared statements
        with conn.pipeline():
            curs = [conn.execute("SELECT %s::int + 1", (i,), prepare=True) for i in range(20)]
        assert [c.fetchone()[0] for c in curs] == list(range(1, 21))
        conn.execute(sql.SQL("DROP TABLE {}").format(ident))


def test_pipeline_transaction(target, table):
    ident = sql.Identifier(table)
    with connect(target) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))
        conn.execute(sql.SQL("CREATE TABLE {} (id int)").format(ident))
        conn.commit()
        with conn.pipeline():
            with conn.transaction():
                for i in range(10):
                    conn.execute(sql.SQL("INSERT INTO {} VALUES (%s)").format(ident), (i,))
            with conn.transaction():
                total = conn.execute(sql.SQL("SELECT sum(id) FROM {}").format(ident))
        assert total.fetchone() == (45,)
        conn.execute(sql.SQL("DROP TABLE {}").format(ident))
        conn.commit()


def test_copy(target, table):
    ident = sql.Identifier(table)
    with connect(target, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))
        conn.execute(sql.SQL("CREATE TABLE {} (id int, v text)").format(ident))
        with conn.cursor().copy(sql.SQL("COPY {} (id, v) FROM STDIN").format(ident)) as copy:
            for i in range(5000):
                copy.write_row((i, f"value {i}" * 3))
        out = []
        with conn.cursor().copy(sql.SQL("COPY (SELECT id, v FROM {} ORDER BY id) TO STDOUT").format(ident)) as copy:
            for row in copy.rows():
                out.append(row)
        assert len(out) == 5000 and out[1234] == ("1234", "value 1234" * 3)
        conn.execute(sql.SQL("DROP TABLE {}").format(ident))


def test_server_side_cursor(target):
    with connect(target) as conn:
        with conn.cursor(name="big") as cur:
            cur.itersize = 100
            cur.execute("SELECT g, repeat('x', 100) FROM generate_series(1, 2000) g")
            n = sum(1 for _ in cur)
        assert n == 2000
        conn.commit()


def test_large_result_and_query(target):
    with connect(target, autocommit=True) as conn:
        big = "y" * (2 * 1024 * 1024)
        assert conn.execute("SELECT length(%s::text)", (big,)).fetchone() == (len(big),)
        rows = conn.execute("SELECT g, md5(g::text) FROM generate_series(1, 50000) g").fetchall()
        assert len(rows) == 50000 and rows[-1][0] == 50000


def test_notices_and_errors(target):
    with connect(target, autocommit=True) as conn:
        notices = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        conn.execute("DO $$ BEGIN RAISE NOTICE 'hello from %', 'plpgsql'; END $$")
        assert notices == ["hello from plpgsql"]
        with pytest.raises(errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        with pytest.raises(errors.UndefinedTable):
            conn.execute("SELECT * FROM no_such_table_anywhere")
        assert conn.execute("SELECT 'still fine'").fetchone() == ("still fine",)


def test_cancel(target):
    with connect(target, autocommit=True) as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        t = time.monotonic()
        try:
            with pytest.raises(errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(30)")
        finally:
            timer.cancel()
        assert time.monotonic() - t < 10
        assert conn.execute("SELECT 1").fetchone() == (1,)


async def test_async_concurrent(target):
    import asyncio

    async def one(i: int) -> int:
        async with await psycopg.AsyncConnection.connect(**target.conninfo(), autocommit=True) as conn:
            total = 0
            for j in range(10):
                total += (await (await conn.execute("SELECT %s::int", (i * 100 + j,))).fetchone())[0]
            return total

    results = await asyncio.gather(*(one(i) for i in range(20)))
    assert results == [sum(i * 100 + j for j in range(10)) for i in range(20)]


def test_connect_options_and_session_parameters(target):
    """Startup parameters and `options` are the session's in every transaction (on the pooled
    listener, whichever server connection it lands on); a SET lasts for the session."""
    with connect(target, autocommit=True, application_name="compat-psycopg",
                 options="-c search_path=pg_catalog,public -c statement_timeout=12345 -c DateStyle=German") as conn:
        assert conn.info.parameter_status("application_name") == "compat-psycopg"
        assert conn.info.parameter_status("DateStyle") == "German, DMY"
        for _ in range(5):
            assert conn.execute("SELECT current_setting('application_name'), current_setting('search_path'), "
                                "current_setting('statement_timeout'), '2024-02-29'::date::text").fetchone() == (
                "compat-psycopg", "pg_catalog,public", "12345ms", "29.02.2024")
        conn.execute("SET search_path = public")
        conn.execute("SET TimeZone = 'Asia/Tokyo'")
        assert conn.info.parameter_status("TimeZone") == "Asia/Tokyo"
        for _ in range(3):
            assert conn.execute("SELECT current_setting('search_path'), current_setting('TimeZone')").fetchone() == (
                "public", "Asia/Tokyo")
