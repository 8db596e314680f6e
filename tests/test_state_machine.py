"""The persisted state machine: legal transitions only, written atomically."""

from __future__ import annotations

import time

import pytest

from pgfleet.fleet import states
from pgfleet.fleet.states import State
from pgfleet.store import InstanceRow, StaleTransition, Store


def _row(name="a", slot=1) -> InstanceRow:
    return InstanceRow(uuid=f"u-{name}", name=name, slot=slot, state=State.STARTING, driver="sandbox",
                       image="postgres:15", memory_mb=128, role=name, verifier="v", stz_policy="on",
                       cooldown_ms=1000, created_at=time.time())


def test_unikraft_states_exist():
    assert {s.value for s in State} == {"starting", "running", "draining", "stopping", "standby", "stopped"}


@pytest.mark.parametrize("a,b", [
    (State.STARTING, State.RUNNING), (State.RUNNING, State.DRAINING), (State.DRAINING, State.STOPPING),
    (State.STOPPING, State.STANDBY), (State.STANDBY, State.STARTING), (State.STOPPED, State.STARTING),
])
def test_legal(a, b):
    states.check(a, b)


@pytest.mark.parametrize("a,b", [
    (State.STANDBY, State.RUNNING), (State.STOPPED, State.RUNNING), (State.RUNNING, State.STARTING),
    (State.STOPPING, State.RUNNING),
])
def test_illegal(a, b):
    with pytest.raises(states.IllegalTransition):
        states.check(a, b)


@pytest.mark.parametrize("b", [State.RUNNING, State.STANDBY, State.STARTING, State.STOPPED])
def test_warm_standby_may_thaw_or_go_cold(b):
    states.check(State.STANDBY, b, tier=states.WARM)


@pytest.mark.parametrize("b", [State.RUNNING, State.STANDBY])
def test_cold_standby_must_start(b):
    with pytest.raises(states.IllegalTransition):
        states.check(State.STANDBY, b, tier=states.COLD)


def test_transition_is_compare_and_set(tmp_path):
    store = Store(tmp_path / "s.db")
    store.insert(_row())
    store.transition("u-a", State.STARTING, State.RUNNING, "test", provisioned=1)
    with pytest.raises(StaleTransition):
        store.transition("u-a", State.STARTING, State.RUNNING, "again")
    row = store.get("u-a")
    assert row.state == State.RUNNING and row.provisioned == 1
    history = store.history("u-a")
    assert [h["to_state"] for h in history] == ["running", "starting"]


def test_state_survives_reopen(tmp_path):
    store = Store(tmp_path / "s.db")
    store.insert(_row("a", 1))
    store.insert(_row("b", 2))
    store.transition("u-b", State.STARTING, State.STANDBY, "x")
    store.close()
    again = Store(tmp_path / "s.db")
    assert {r.name: r.state for r in again.all()} == {"a": "starting", "b": "standby"}
    assert again.used_slots() == {1, 2}


def test_names_are_unique(tmp_path):
    import sqlite3

    store = Store(tmp_path / "s.db")
    store.insert(_row("a", 1))
    with pytest.raises(sqlite3.IntegrityError):
        store.insert(_row("a", 2))


def test_the_fleet_refuses_an_illegal_transition_and_writes_nothing(tmp_path):
    """The graph is enforced where transitions are made, not only described."""
    from pgfleet.drivers.sandbox.driver import SandboxDriver
    from pgfleet.fleet.manager import Fleet

    store = Store(tmp_path / "s.db")
    row = _row()
    store.insert(row)
    store.transition(row.uuid, State.STARTING, State.STANDBY, "test")
    fleet = Fleet(store, SandboxDriver.__new__(SandboxDriver), tmp_path)
    with pytest.raises(states.IllegalTransition):
        fleet.transitions.change_state(row.uuid, State.STANDBY, State.RUNNING, "skipping starting")
    assert store.get(row.uuid).state == State.STANDBY
    assert [h["to_state"] for h in store.history(row.uuid)] == ["standby", "starting"]


async def test_find_sees_every_write_of_the_store(env):
    """find() answers from memory between writes; any write (rotation, rename, delete) is seen."""
    created = await env.fleet.create("seen", autostart=False)
    first = env.fleet.find("seen")
    assert first is env.fleet.find("seen")  # no write in between: the same row
    await env.fleet.rotate_password("seen", "another-password-123")
    assert env.fleet.find("seen").verifier != created.row.verifier
    env.fleet.store.db.execute("UPDATE instances SET name='renamed' WHERE uuid=?", (created.row.uuid,))
    assert env.fleet.find("seen") is None and env.fleet.find("renamed") is not None
    await env.fleet.delete(created.row.uuid)
    assert env.fleet.find("renamed") is None
