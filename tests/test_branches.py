"""Branches and point-in-time restore on real Postgres (sandbox driver), through the proxy."""

from __future__ import annotations

import asyncio
import stat
import time

import psycopg
import pytest

from pgfleet.fleet.branches import Backups, Branches
from pgfleet.fleet.errors import InvalidRequest, NotFound
from pgfleet.fleet.states import State

from .conftest import SANDBOX_SKIP
from .test_daemon import _psql

pytestmark = pytest.mark.skipif(SANDBOX_SKIP is not None, reason=f"SKIPPED LOUDLY: {SANDBOX_SKIP}")


@pytest.fixture
async def fb(env):
    """env with archiving on: (env, backups, branches)."""
    backups = Backups(env.fleet, poll_s=3600)
    return env, backups, Branches(env.fleet, backups)


async def sql(env, name: str, password: str, query: str, params=()):
    async with await psycopg.AsyncConnection.connect(**env.conninfo(name, password), autocommit=True) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall() if cur.description else None


async def create_backed_up(env, backups: Backups, name: str) -> tuple[str, str]:
    """A new database once its first base backup exists (its restore window opens): (uuid, password)."""
    created = await env.fleet.create(name)
    deadline = time.monotonic() + 60
    while not backups.base_backups(created.row.uuid):
        assert time.monotonic() < deadline, "the first base backup never appeared"
        await asyncio.sleep(0.05)
    return created.row.uuid, created.password


async def test_branch_at_time_across_suspends(fb):
    env, backups, branches = fb
    _, pw = await create_backed_up(env, backups, "shop")
    await sql(env, "shop", pw, "CREATE TABLE t(x int, at text)")
    await sql(env, "shop", pw, "INSERT INTO t VALUES (1, 't1')")
    await env.fleet.suspend("shop")
    await env.fleet.resume("shop")
    await sql(env, "shop", pw, "INSERT INTO t VALUES (2, 't2')")
    t2 = time.time()
    await env.fleet.suspend("shop")
    await env.fleet.resume("shop")
    await sql(env, "shop", pw, "INSERT INTO t VALUES (3, 't3')")

    # parent running: the branch flushes its WAL first
    b = await branches.branch("shop", "shop-at-t2", at=t2)
    assert b.row.role == "shop-at-t2"
    rows = await sql(env, "shop-at-t2", b.password, "SELECT x FROM t ORDER BY x")
    assert rows == [(1,), (2,)]
    # the database inside carries the branch's name, not its parent's
    assert await sql(env, "shop-at-t2", b.password, "SELECT current_database()") == [("shop-at-t2",)]
    # its own credentials: the parent's password does not open it
    with pytest.raises(psycopg.OperationalError):
        await sql(env, "shop-at-t2", pw, "SELECT 1")

    # parent in standby: the WAL written before the suspend is in the archive
    await env.fleet.suspend("shop")
    t3 = time.time()
    b3 = await branches.branch("shop", "shop-at-t3", at=t3)
    assert await sql(env, "shop-at-t3", b3.password, "SELECT x FROM t ORDER BY x") == [(1,), (2,), (3,)]

    with pytest.raises(InvalidRequest, match="future"):
        await branches.branch("shop", "nope", at=time.time() + 3600)
    with pytest.raises(InvalidRequest, match="outside the restore window"):
        await branches.branch("shop", "nope", at=time.time() - 86400)


async def test_branch_of_now_is_independent(fb):
    env, backups, branches = fb
    parent = await env.fleet.create("app")
    pw = parent.password
    await sql(env, "app", pw, "CREATE TABLE t(x int); INSERT INTO t SELECT generate_series(1, 1000)")
    # a client of the parent keeps its session and is answered throughout the branch
    async with await psycopg.AsyncConnection.connect(**env.conninfo("app", pw), autocommit=True) as client:
        answered, done = [], asyncio.Event()

        async def keep_querying() -> None:
            while not done.is_set():
                answered.append((await (await client.execute("SELECT count(*) FROM t")).fetchone())[0])

        querying = asyncio.create_task(keep_querying())
        running = await branches.branch("app", "app-copy")
        done.set()
        await querying
        assert answered and set(answered) == {1000}
    assert await sql(env, "app-copy", running.password, "SELECT count(*) FROM t") == [(1000,)]
    assert await sql(env, "app-copy", running.password, "SELECT current_database()") == [("app-copy",)]
    await sql(env, "app-copy", running.password, "INSERT INTO t VALUES (-1)")
    await sql(env, "app", pw, "INSERT INTO t VALUES (-2)")
    assert await sql(env, "app", pw, "SELECT count(*) FROM t WHERE x < 0") == [(1,)]
    assert await sql(env, "app-copy", running.password, "SELECT x FROM t WHERE x < 0") == [(-1,)]
    # the branch's role owns what the parent's role owned
    assert await sql(env, "app-copy", running.password, "SELECT tableowner FROM pg_tables WHERE tablename='t'") == [("app-copy",)]

    # files of the template layer the parent dropped (REINDEX: new relfilenodes) stay dropped
    await sql(env, "app", pw, "REINDEX SYSTEM app")
    await env.fleet.suspend("app")
    standby = await branches.branch("app", "app-copy2")
    assert env.fleet.get("app").state == State.STANDBY
    assert await sql(env, "app-copy2", standby.password, "SELECT count(*) FROM t") == [(1001,)]
    assert await sql(env, "app-copy2", standby.password, "SELECT current_database()") == [("app-copy2",)]
    storage = env.fleet.driver.storage
    if storage is not None and storage.is_overlay(env.fleet.spec(env.fleet.get("app")).home):
        def whiteouts(name: str) -> set[str]:
            upper = storage.layout(env.fleet.spec(env.fleet.get(name)).home).upper
            return {str(p.relative_to(upper)) for p in upper.rglob("*")
                    if stat.S_ISCHR(p.lstat().st_mode) and p.lstat().st_rdev == 0}

        dropped = {w for w in whiteouts("app") if w.startswith("base/")}  # (pg_stat/ is the server's own)
        assert dropped and dropped <= whiteouts("app-copy2")


async def test_restore_in_place_and_after_delete(fb):
    env, backups, branches = fb
    _, pw = await create_backed_up(env, backups, "ledger")
    await sql(env, "ledger", pw, "CREATE TABLE t(x int); INSERT INTO t VALUES (1)")
    t1 = time.time()
    await sql(env, "ledger", pw, "INSERT INTO t VALUES (2)")
    restored, kept = await branches.restore("ledger", t1)
    assert restored.name == "ledger" and kept.name.startswith("ledger-before-")
    # same credentials, restored data, the same database name inside
    assert await sql(env, "ledger", pw, "SELECT x FROM t ORDER BY x") == [(1,)]
    assert await sql(env, "ledger", pw, "SELECT current_database()") == [("ledger",)]
    # the state it replaced is kept; its next start renames the database inside after it
    assert kept.state == State.STANDBY
    async with await psycopg.AsyncConnection.connect(**{**env.conninfo(kept.name, pw), "user": "ledger"}) as conn:
        cur = await conn.execute("SELECT current_database(), count(*) FROM t")
        assert await cur.fetchone() == (kept.name, 2)
    t_end = time.time()
    await env.fleet.delete(kept.uuid)
    gone = await branches.branch(kept.name, "ledger-undo", at=t_end)
    assert await sql(env, "ledger-undo", gone.password, "SELECT x FROM t ORDER BY x") == [(1,), (2,)]
    with pytest.raises(NotFound):
        await branches.branch(kept.name, "ledger-now")  # a deleted database has no "now"
    # once its retention has passed, a deleted database's repository goes
    await backups.tick(now=time.time() + backups.archive(kept.uuid).retention_s + 60)
    assert not backups.repo(kept.uuid).exists()
    with pytest.raises(NotFound):
        backups.find(kept.name)


def test_cli_branch_backups_restore_purge(daemon):
    """The user's path: backups window, branch --at, branch of now, restore --at, delete --purge."""
    from datetime import datetime, timezone

    daemon.json("db", "create", "shop")
    uri = daemon.json("db", "show", "shop")["uri"]
    _psql(daemon, uri, "CREATE TABLE t AS SELECT 1 AS x")
    daemon.json("db", "backup", "shop")
    at = _psql(daemon, uri, "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
    _psql(daemon, uri, "INSERT INTO t VALUES (2)")
    info = daemon.json("db", "backups", "shop")
    assert info["window"]["to"] == "now" and info["base_backups"] and not info["deleted"]

    branch = daemon.json("db", "branch", "shop", "shop-pr1", "--at", at)
    assert branch["name"] == "shop-pr1" and branch["password"]
    assert _psql(daemon, branch["uri"], "SELECT string_agg(x::text, ',' ORDER BY x) FROM t") == "1"
    now = daemon.json("db", "branch", "shop", "shop-pr2")
    assert _psql(daemon, now["uri"], "SELECT string_agg(x::text, ',' ORDER BY x) FROM t") == "1,2"

    future = datetime.fromtimestamp(time.time() + 3600, timezone.utc).isoformat()
    bad = daemon.cli("db", "branch", "shop", "shop-pr3", "--at", future, check=False)
    assert bad.returncode != 0 and "future" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    taken = daemon.cli("db", "branch", "shop", "shop-pr1", check=False)
    assert taken.returncode != 0 and "already exists" in taken.stderr

    restored = daemon.json("db", "restore", "shop", "--at", at)
    assert _psql(daemon, uri, "SELECT string_agg(x::text, ',' ORDER BY x) FROM t") == "1"
    kept = restored["kept"]["name"]
    daemon.cli("db", "delete", kept)
    assert daemon.json("db", "backups", kept)["deleted"]
    daemon.cli("db", "delete", "shop-pr2", "--purge")
    gone = daemon.cli("db", "backups", "shop-pr2", check=False)
    assert gone.returncode != 0 and "no backups" in gone.stderr
