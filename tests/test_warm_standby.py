"""Warm standby (sandbox): frozen processes, sessions kept, thawed on the next packet; cold
after `cold_after_ms`; the host memory manager demoting least recently used idle databases.
Real Postgres, real proxies, real libpq clients."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import psycopg
import pytest

from pgfleet.drivers.sandbox.procscan import find_postmaster
from pgfleet.fleet.memory import MemoryManager
from pgfleet.fleet.states import State
from pgfleet.proxy.server import ProxyServer

from .conftest import postmasters_under, start_daemon, stop_daemon
from .test_daemon import _psql


@pytest.fixture
async def listeners(env):
    pooled = ProxyServer(env.fleet, "127.0.0.1", 0, mode="transaction")
    await pooled.start()
    env.fleet.on_delete.append(pooled.forget_database)
    env.fleet.on_freeze.append(pooled.close_idle_server_connections)
    yield {"direct": env.proxy, "pooled": pooled}
    await pooled.close()


async def aconnect(server, name, password, **params):
    return await psycopg.AsyncConnection.connect(host="127.0.0.1", port=server.port, dbname=name, user=name,
                                                 password=password, connect_timeout=30, autocommit=True, **params)


async def scalar(conn, sql):
    cur = await conn.execute(sql)
    return (await cur.fetchone())[0]


async def until(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def no_clients(env, name) -> None:
    """The proxy has seen the client leave (psycopg's close does not wait for that)."""
    uuid = env.fleet.get(name).uuid
    await until(lambda: env.fleet.rt[uuid].clients == 0 and env.fleet.rt[uuid].busy == 0)


def warm(row) -> bool:
    return row.state == State.STANDBY and row.standby_tier == "warm"


def frozen(env, name) -> bool:
    return env.fleet.driver.is_frozen(env.fleet.spec(env.fleet.get(name)))


async def test_idle_goes_warm_then_cold_and_wakes_from_both(env):
    created = await env.fleet.create("tiers", cooldown_ms=150, cold_after_ms=1500)
    async with await aconnect(env.proxy, "tiers", created.password) as c:
        await c.execute("CREATE TABLE t AS SELECT generate_series(1, 100) AS x")
    row = await env.fleet.wait_for("tiers", warm, timeout_s=30)
    assert warm(row) and row.stop_reason == "idle"
    assert frozen(env, "tiers") and find_postmaster(env.fleet.driver.data_dir(env.fleet.spec(row))) is not None
    assert env.fleet.backend_of(row.uuid) is None
    # a new connection thaws it: no Postgres start
    async with await aconnect(env.proxy, "tiers", created.password) as c:
        assert await scalar(c, "SELECT sum(x) FROM t") == 5050
    assert env.fleet.get("tiers").state == State.RUNNING and not frozen(env, "tiers")
    # warm, then after cold_after_ms cold: no process left
    row = await env.fleet.wait_for("tiers", lambda r: r.state == State.STANDBY and r.standby_tier == "cold",
                                   timeout_s=30)
    assert row.standby_tier == "cold"
    assert find_postmaster(env.fleet.driver.data_dir(env.fleet.spec(row))) is None
    assert env.fleet.memory_charged(row) == (0, 0)
    async with await aconnect(env.proxy, "tiers", created.password) as c:
        assert await scalar(c, "SELECT count(*) FROM t") == 100
    history = [h["reason"] for h in env.fleet.store.history(row.uuid)]
    assert "warm for cold_after_ms" in history


@pytest.mark.parametrize("listener", ["direct", "pooled"])
async def test_idle_session_is_held_across_warm_standby(env, listeners, listener):
    created = await env.fleet.create("held", policy="idle", cooldown_ms=150)
    c = await aconnect(listeners[listener], "held", created.password)
    try:
        await c.execute("CREATE TABLE t (x int)")
        await c.execute("INSERT INTO t VALUES (1)")
        await c.execute("SET application_name = 'kept'")
        pid = await scalar(c, "SELECT pg_backend_pid()")
        row = await env.fleet.wait_for("held", warm, timeout_s=30)
        assert warm(row) and frozen(env, "held"), "an idle session must not keep an `idle` database awake"
        # the next packet on the held session thaws it; the same server session goes on
        await c.execute("INSERT INTO t VALUES (2)")
        assert await scalar(c, "SELECT sum(x) FROM t") == 3
        if listener == "direct":
            assert await scalar(c, "SELECT pg_backend_pid()") == pid
            assert await scalar(c, "SHOW application_name") == "kept"
        assert env.fleet.get("held").state == State.RUNNING
    finally:
        await c.close()


@pytest.mark.parametrize("listener", ["direct", "pooled"])
async def test_never_frozen_mid_transaction(env, listeners, listener):
    created = await env.fleet.create("midtx", policy="idle", cooldown_ms=100)
    c = await aconnect(listeners[listener], "midtx", created.password)
    try:
        await c.execute("BEGIN")
        await c.execute("CREATE TABLE t AS SELECT 1 AS x")
        row = await env.fleet.wait_for("midtx", lambda r: r.state != State.RUNNING, timeout_s=1.0)
        assert row.state == State.RUNNING and not frozen(env, "midtx")
        from pgfleet.fleet.errors import Unavailable

        with pytest.raises(Unavailable, match="busy"):
            await env.fleet.suspend("midtx", tier="warm")
        await c.execute("COMMIT")
        row = await env.fleet.wait_for("midtx", warm, timeout_s=30)
        assert warm(row)
        assert await scalar(c, "SELECT x FROM t") == 1
    finally:
        await c.close()


async def test_a_new_client_of_a_warm_database_takes_the_session_opened_at_the_freeze(env):
    """No fork from a postmaster in swap: the session the proxy opened as the database was
    frozen serves the first new client after the thaw, as its own user and database."""
    created = await env.fleet.create("spare", policy="idle", cooldown_ms=600_000)
    spares = env.proxy.direct.spares
    async with await aconnect(env.proxy, "spare", created.password) as c:
        await c.execute("CREATE TABLE t AS SELECT 1 AS x")
        uuid = env.fleet.get("spare").uuid
    await no_clients(env, "spare")
    await env.fleet.suspend("spare", tier="warm")
    assert len(spares) == 1 and spares.counts["opened"] == 1
    async with await aconnect(env.proxy, "spare", created.password) as c:
        assert spares.counts["taken"] == 1 and len(spares) == 0
        assert await scalar(c, "SELECT current_user || '/' || current_database()") == "spare/spare"
        assert await scalar(c, "SELECT x FROM t") == 1
        # the cancel key the client got reaches that very backend
        task = asyncio.ensure_future(c.execute("SELECT pg_sleep(30)"))
        await until(lambda: env.fleet.rt[uuid].busy > 0)
        await c.cancel_safe()
        with pytest.raises(psycopg.errors.QueryCanceled):
            await task
    # cold: the spare opened at this freeze goes with the processes, no socket left behind
    await no_clients(env, "spare")
    await env.fleet.suspend("spare", tier="warm")
    assert len(spares) == 1
    await env.fleet.suspend("spare", tier="cold")
    await until(lambda: len(spares) == 0)


async def test_a_spare_never_serves_a_client_that_came_after_the_thaw(env):
    """ALTER ROLE ... SET in a held session after the thaw is seen by every later new
    session: the spare from before it is closed, not handed out."""
    created = await env.fleet.create("stale", policy="idle", cooldown_ms=600_000)
    spares = env.proxy.direct.spares
    held = await aconnect(env.proxy, "stale", created.password)
    try:
        await no_clients_busy(env, "stale")
        await env.fleet.suspend("stale", tier="warm")
        assert len(spares) == 1
        await held.execute("ALTER ROLE stale SET work_mem = '7MB'")  # thaws it
        async with await aconnect(env.proxy, "stale", created.password) as c:
            assert await scalar(c, "SHOW work_mem") == "7MB"
        assert spares.counts["taken"] == 0 and spares.counts["discarded"] == 1
    finally:
        await held.close()


async def test_a_spare_serves_only_a_client_with_its_startup_parameters(env):
    created = await env.fleet.create("params", policy="idle", cooldown_ms=600_000)
    spares = env.proxy.direct.spares
    async with await aconnect(env.proxy, "params", created.password):
        pass
    # the first spare has the parameters of a bare client: not taken by this one; the next
    # is opened with the parameters of that last client, and taken
    for taken in (0, 1):
        await no_clients(env, "params")
        await env.fleet.suspend("params", tier="warm")
        async with await aconnect(env.proxy, "params", created.password, application_name="other") as c:
            assert await scalar(c, "SHOW application_name") == "other"
        assert spares.counts["taken"] == taken


async def no_clients_busy(env, name) -> None:
    uuid = env.fleet.get(name).uuid
    await until(lambda: env.fleet.rt[uuid].busy == 0)


async def test_a_warm_database_is_reclaimed_again_once_its_freeze_settled(env, monkeypatch):
    """Pages touched just before a freeze resist its reclaim: the fleet reclaims a second
    time SETTLE_S later, under the database's lock, only if it is still warm."""
    from pgfleet.fleet import standby

    monkeypatch.setattr(standby, "SETTLE_S", 0.05)
    calls: list[int] = []
    again = env.fleet.driver.reclaim_again

    async def recorded(spec):
        charged = await again(spec)
        calls.append(charged)
        return charged

    monkeypatch.setattr(env.fleet.driver, "reclaim_again", recorded)
    created = await env.fleet.create("settle", policy="idle", cooldown_ms=600_000)
    async with await aconnect(env.proxy, "settle", created.password) as c:
        await c.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS x")
    await no_clients(env, "settle")
    await env.fleet.suspend("settle", tier="warm")
    await until(lambda: len(calls) == 1)
    row = env.fleet.get("settle")
    assert warm(row) and frozen(env, "settle")
    if env.fleet.driver.warm_mode() == "reclaim":
        assert 0 < calls[0] <= env.fleet.memory_charged(row)[0] + (256 << 10)
    # thawed before it settles: no second reclaim of a running database
    monkeypatch.setattr(standby, "SETTLE_S", 0.3)
    await env.fleet.suspend("settle", tier="warm")
    async with await aconnect(env.proxy, "settle", created.password) as c:
        assert await scalar(c, "SELECT count(*) FROM t") == 1000
        ran = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.5, ran.set_result, None)
        await ran  # past the settle time, the session open
    assert len(calls) == 1


async def test_cancel_works_after_a_thaw(env):
    created = await env.fleet.create("cancel", policy="idle", cooldown_ms=100)
    c = await aconnect(env.proxy, "cancel", created.password)
    try:
        assert await scalar(c, "SELECT 1") == 1
        await env.fleet.wait_for("cancel", warm, timeout_s=30)
        query = asyncio.ensure_future(c.execute("SELECT pg_sleep(30)"))
        async with await aconnect(env.proxy, "cancel", created.password) as other:
            for _ in range(1000):
                if await scalar(other, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"):
                    break
                await asyncio.sleep(0.01)
        await c.cancel_safe()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            await query
        assert time.monotonic() - started < 10
    finally:
        await c.close()


async def test_explicit_tiers_stop_and_delete_of_a_warm_database(env):
    created = await env.fleet.create("manual")
    async with await aconnect(env.proxy, "manual", created.password) as c:
        await c.execute("CREATE TABLE t AS SELECT 5 AS x")
    await no_clients(env, "manual")
    row = await env.fleet.suspend("manual", tier="warm")
    assert warm(row) and frozen(env, "manual")
    row = await env.fleet.suspend("manual")  # cold
    assert row.standby_tier == "cold" and find_postmaster(env.fleet.driver.data_dir(env.fleet.spec(row))) is None
    await env.fleet.resume("manual")
    await env.fleet.suspend("manual", tier="warm")
    row = await env.fleet.stop("manual")
    assert row.state == State.STOPPED
    assert find_postmaster(env.fleet.driver.data_dir(env.fleet.spec(row))) is None
    await env.fleet.resume("manual")
    await env.fleet.suspend("manual", tier="warm")
    spec = env.fleet.spec(env.fleet.get("manual"))
    await env.fleet.delete("manual")
    assert find_postmaster(env.fleet.driver.data_dir(spec)) is None


async def test_memory_manager_demotes_least_recently_used_idle_first(env):
    made = {n: await env.fleet.create(n, cooldown_ms=600_000) for n in ("old", "mid", "new", "busy")}
    for name in ("old", "mid", "new"):  # touched in this order: "old" is the least recently used
        async with await aconnect(env.proxy, name, made[name].password) as c:
            await scalar(c, "SELECT 1")
        await no_clients(env, name)
    busy = await aconnect(env.proxy, "busy", made["busy"].password)
    try:
        await busy.execute("BEGIN")
        manager = MemoryManager(env.fleet, budget_bytes=1)
        charged = manager.charged()
        total = sum(charged.values())
        assert total > 0
        # a budget a little short (charges move by some pages between looks): exactly the
        # least recently used idle one goes
        manager.budget_bytes = total - (4 << 20)
        report = await manager.tick()
        assert [name for name, _ in report.demoted] == ["old"]
        assert env.fleet.get("old").state == State.STANDBY
        assert {env.fleet.get(n).state for n in ("mid", "new", "busy")} == {State.RUNNING}
        # no budget at all: every idle one is demoted, the one in a transaction never
        manager.budget_bytes = 1
        for _ in range(3):
            await manager.tick()
        assert {env.fleet.get(n).state for n in ("old", "mid", "new")} == {State.STANDBY}
        assert env.fleet.get("old").standby_tier == "cold"  # warm ones went on to cold
        assert env.fleet.get("busy").state == State.RUNNING
        assert await scalar(busy, "SELECT 1") == 1
        await busy.execute("COMMIT")
    finally:
        await busy.close()


async def test_memory_manager_never_takes_cold_a_warm_database_whose_held_session_waits(env):
    """A held session's query waiting for the thaw makes its database busy: the memory
    manager leaves it warm (taking it cold would end the session under its query; seen in a
    storm of 1,000 woken at once under real memory pressure)."""
    created = await env.fleet.create("waits", policy="idle", cooldown_ms=600_000)
    c = await aconnect(env.proxy, "waits", created.password)
    try:
        assert await scalar(c, "SELECT 1") == 1
        await no_clients_busy(env, "waits")
        await env.fleet.suspend("waits", tier="warm")
        uuid = env.fleet.get("waits").uuid
        manager = MemoryManager(env.fleet, budget_bytes=1)
        async with env.fleet.rt.locked(uuid):  # the thaw waits behind this
            query = asyncio.ensure_future(scalar(c, "SELECT 42"))
            await until(lambda: env.fleet.rt[uuid].busy > 0)
            report = await manager.tick()
            assert report.demoted == [] and warm(env.fleet.get("waits"))
        assert await query == 42
    finally:
        await c.close()


async def test_without_swap_the_warm_tier_freezes_and_says_so(env):
    from pgfleet.drivers import swap

    if swap.total_bytes() > 0:
        pytest.skip("SKIPPED LOUDLY: this host has swap enabled; the no-swap case cannot be shown here")
    status = env.fleet.standby_status()
    assert status["warm_mode"] == "freeze" and "WITHOUT reclaim" in status["explain"]
    created = await env.fleet.create("noswap")
    async with await aconnect(env.proxy, "noswap", created.password) as c:
        await c.execute("CREATE TABLE t AS SELECT generate_series(1, 20000) AS x")
    await no_clients(env, "noswap")
    row = await env.fleet.suspend("noswap", tier="warm")
    charged, swapped = env.fleet.memory_charged(row)
    assert charged > 4 << 20 and swapped == 0  # frozen, nothing reclaimed
    async with await aconnect(env.proxy, "noswap", created.password) as c:
        assert await scalar(c, "SELECT 1") == 1


def _postmaster(pids: set[int]) -> int:
    """The one of these postgres processes whose parent is not one of them."""
    def parent(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    (postmaster,) = [p for p in pids if parent(p) not in pids]
    return postmaster


def test_restart_kill_9_and_down_with_warm_databases(daemon_env):
    """kill -9 of the daemon: the next one re-attaches to the frozen database (warm, and
    woken by a thaw); `pgfleet down` leaves no frozen process behind."""
    home = Path(daemon_env["PGFLEET_HOME"])
    d = start_daemon(home, daemon_env)
    try:
        uri = d.json("db", "create", "w")["uri"]
        _psql(d, uri, "CREATE TABLE t AS SELECT generate_series(1, 10) AS x")
        shown = d.json("db", "suspend", "w", "--tier", "warm")
        assert shown["state"] == "standby" and shown["standby_tier"] == "warm"
        assert shown["memory_charged_bytes"] > 0
        before = set(postmasters_under(home))
        postmaster = _postmaster(before)
        os.kill(d.info["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{d.info['pid']}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        d = start_daemon(home, daemon_env, like=d)
        shown = d.json("db", "show", "w")
        assert shown["standby_tier"] == "warm" and set(postmasters_under(home)) == before
        assert _psql(d, uri, "SELECT sum(x) FROM t") == "55"
        assert d.json("db", "show", "w")["start_count"] == 2  # a thaw, not a second Postgres
        # the same Postgres, less the spare session the dead daemon held (its backend ended
        # with the daemon's socket once thawed)
        assert postmaster in postmasters_under(home)
        d.json("db", "suspend", "w", "--tier", "warm")
        assert "frozen" in d.cli("status").stdout
        d.cli("down")
        assert postmasters_under(home) == []
        d = start_daemon(home, daemon_env, like=d)
        assert d.json("db", "show", "w")["standby_tier"] == "cold"
        assert _psql(d, uri, "SELECT count(*) FROM t") == "10"
    finally:
        _thaw_all(home)
        stop_daemon(d)


def _thaw_all(home: Path) -> None:
    """A failed test must not leave frozen processes (SIGKILL waits for a thaw on cgroup v1)."""
    from pgfleet.drivers.sandbox.driver import _home_tag

    root = Path("/sys/fs/cgroup/freezer/pgfleet") / _home_tag(home / "sandbox")
    for state in root.glob("*/freezer.state"):
        try:
            state.write_text("THAWED")
        except OSError:
            pass
