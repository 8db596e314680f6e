"""Density: a control plane that stays cheap with thousands of databases defined (paging,
no per-database objects for idle ones, recovery that skips standby databases, bounded
start admission)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from pgfleet.drivers.sandbox.driver import SandboxDriver
from pgfleet.fleet.manager import Fleet
from pgfleet.fleet.states import State
from pgfleet.store import Store

from .conftest import start_daemon, stop_daemon


@pytest.fixture
def big_fleet_daemon(daemon_env):
    """A daemon configured for more awake databases than any test host has pids for."""
    env = dict(daemon_env, PGFLEET_QUOTA_LIVE_INSTANCES="5000000")
    d = start_daemon(Path(env["PGFLEET_HOME"]), env)
    try:
        yield d
    finally:
        stop_daemon(d)


def test_db_list_pages_and_filters_and_host_limits(big_fleet_daemon):
    daemon = big_fleet_daemon
    for name in ("d1", "d2", "d3", "d4"):
        daemon.cli("db", "create", name, "--no-start", "--no-save-password")
    daemon.cli("db", "resume", "d3")

    first = daemon.cli("db", "list", "--limit", "3", "--json")
    assert [r["name"] for r in json.loads(first.stdout)] == ["d1", "d2", "d3"]
    assert "--cursor d3" in first.stderr
    rest = daemon.json("db", "list", "--limit", "3", "--cursor", "d3")
    assert [r["name"] for r in rest] == ["d4"]
    assert [r["name"] for r in daemon.json("db", "list", "--limit", "1", "--all")] == ["d1", "d2", "d3", "d4"]
    assert [r["name"] for r in daemon.json("db", "list", "--state", "running")] == ["d3"]
    assert [r["name"] for r in daemon.json("db", "list", "--state", "standby")] == ["d1", "d2", "d4"]

    bad = daemon.cli("db", "list", "--state", "asleep", check=False)
    assert bad.returncode != 0 and "unknown state" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    status = daemon.json("status")
    assert status["databases"] == 4 and status["states"] == {"running": 1, "standby": 3}

    # host limits: 5,000,000 awake databases need more pids than this host has
    short = {c["name"] for c in status["host_limits"] if not c["ok"]}
    assert "kernel.pid_max" in short and "open files (daemon)" in short
    assert "host limit too low: kernel.pid_max" in daemon.cli("status").stdout
    assert "cannot hold the configured fleet: kernel.pid_max" in (daemon.home / "daemon.log").read_text()


def test_host_limit_checks_hold_a_small_fleet(tmp_path):
    from pgfleet import hostlimits

    small = hostlimits.checks(tmp_path, instances=10, live_instances=2)
    assert {c.name for c in small} >= {"open files (daemon)", "kernel.pid_max", "disk free (MiB)"}
    assert hostlimits.problems(small) == [], "a 2-core CI host holds ten databases"
    huge = hostlimits.problems(hostlimits.checks(tmp_path, instances=10**9, live_instances=10**7))
    assert any(p.startswith("disk free (MiB)") for p in huge) and any("kernel.pid_max" in p for p in huge)


async def test_runtime_objects_only_for_databases_in_use(env):
    fleet = env.fleet
    made = await fleet.create("inuse", autostart=False)
    uuid = made.row.uuid
    assert fleet.get("inuse").state == State.STANDBY
    assert uuid not in fleet.rt, "a database in standby keeps no in-memory object"

    await fleet.ensure_running(uuid)
    assert fleet.rt[uuid].backend is not None
    async with fleet.lease(uuid):
        pass
    await fleet.suspend(uuid)
    assert uuid not in fleet.rt, "dropped again once it is back in standby"

    await fleet.resume(uuid)
    await fleet.stop(uuid)
    assert uuid not in fleet.rt


async def test_recovery_touches_only_running_databases(env):
    fleet = env.fleet
    names = ["rec-a", "rec-b", "rec-c"]
    for name in names:
        await fleet.create(name, autostart=False)
    await fleet.ensure_running("rec-b")

    # a second daemon life on the same home (the first one's postmaster is still up)
    store = Store(env.home / "state.db")
    again = Fleet(store, SandboxDriver(env.home / "sandbox"), env.home)
    try:
        await again.driver.prepare()
        await again.recover()
        b = again.get("rec-b").uuid
        assert set(again.rt) == {b}, "only the running database gets a Runtime"
        assert again.rt[b].backend is not None
        assert {again.get(n).state for n in ("rec-a", "rec-c")} == {State.STANDBY}
        assert again.driver.is_running(again.spec(again.get("rec-b")))
    finally:
        await again.shutdown()  # suspends rec-b through the second life's driver
        store.close()


async def test_wake_storm_is_admitted_through_a_bounded_queue(env, monkeypatch):
    """More databases woken at once than there are start slots: all are served, and never
    more than the bound start at the same time."""
    fleet = Fleet(env.fleet.store, env.fleet.driver, env.home, start_concurrency=2)
    names = [f"storm{i}" for i in range(6)]
    for name in names:
        await fleet.create(name, autostart=False)
    driver = fleet.driver
    starting, peak = 0, 0
    real_start = SandboxDriver.start

    async def counted_start(self, spec):
        nonlocal starting, peak
        starting += 1
        peak = max(peak, starting)
        try:
            return await real_start(self, spec)
        finally:
            starting -= 1

    monkeypatch.setattr(SandboxDriver, "start", counted_start)
    try:
        backends = await asyncio.wait_for(asyncio.gather(*(fleet.ensure_running(n) for n in names)), 120)
        assert all(b is not None for b in backends)
        assert peak == 2, f"{peak} starts ran at once with 2 slots"
        assert {fleet.get(n).state for n in names} == {State.RUNNING}
    finally:
        for name in names:
            await fleet.delete(name)
    assert driver is env.fleet.driver


async def test_create_without_start_is_one_commit_and_a_cut_short_one_is_swept(env):
    """A database created without a start is recorded complete in one step; a provision
    that a crash cut short (directory, no row) is removed at the next recovery."""
    fleet = env.fleet
    made = await fleet.create("onecommit", autostart=False)
    history = fleet.store.history(made.row.uuid)
    assert [(e["from_state"], e["to_state"]) for e in history] == [(None, "standby")]
    assert fleet.get("onecommit").provisioned == 1

    orphan = env.home / "instances" / "0d5e1c4b-cut-short"
    fleet.driver.storage.provision(orphan, 3_999_000)
    await fleet.recover()
    assert not orphan.exists()
    assert fleet.get("onecommit").state == State.STANDBY


async def test_clients_of_a_wake_storm_wait_their_turn_and_are_all_served(env, monkeypatch):
    """One start at a time and each start slowed down: the last client waits for every
    start before its own, and is served, not refused."""
    import psycopg

    from pgfleet.proxy import sessions

    monkeypatch.setattr(env.fleet, "start_slots", asyncio.Semaphore(1))
    made = [await env.fleet.create(f"queue{i}", autostart=False) for i in range(5)]
    real_start = SandboxDriver.start

    async def slow_start(self, spec):
        await asyncio.sleep(0.4)  # a loaded host: each start takes a while
        return await real_start(self, spec)

    monkeypatch.setattr(SandboxDriver, "start", slow_start)
    monkeypatch.setattr(sessions, "WAKE_TIMEOUT_S", 0.5)  # shorter than the queue: must not matter

    async def client(c):
        conn = await psycopg.AsyncConnection.connect(**env.conninfo(c.row.name, c.password), autocommit=True)
        async with conn:
            return (await (await conn.execute("SELECT current_user")).fetchone())[0]

    got = await asyncio.wait_for(asyncio.gather(*(client(c) for c in made)), 120)
    assert got == [c.row.name for c in made]
