"""The state machine at work: a transition is checked, committed, announced; waiters see it."""

from __future__ import annotations

import asyncio
import time

import pytest

from pgfleet.fleet import states
from pgfleet.fleet.events import EventLog
from pgfleet.fleet.states import State
from pgfleet.fleet.transitions import Transitions
from pgfleet.store import InstanceRow, Store
from tests.polling import until


@pytest.fixture
def machine(tmp_path):
    store = Store(tmp_path / "state.db")
    row = InstanceRow(uuid="u1", name="shop", slot=1, state=State.STARTING, driver="fake", image="postgres:15",
                      memory_mb=128, role="shop", verifier="v", stz_policy="on", cooldown_ms=1000,
                      created_at=time.time())
    store.insert(row)

    def lookup(ref: str) -> InstanceRow:
        found = store.get(ref) or store.by_name(ref)
        assert found is not None
        return found
    yield Transitions(store, EventLog(), lookup), store
    store.close()


async def test_a_legal_transition_is_committed_and_announced(machine):
    transitions, store = machine
    transitions.change_state("u1", State.STARTING, State.RUNNING, "created", start_count=1)
    assert store.get("u1").state == State.RUNNING and store.get("u1").start_count == 1
    event = transitions.events.recent("shop", kinds={"transition"})[-1].to_json()
    assert (event["kind"], event["from"], event["to"], event["database"]) == ("transition", "starting",
                                                                              "running", "shop")


async def test_an_illegal_transition_writes_nothing(machine):
    transitions, store = machine
    with pytest.raises(states.IllegalTransition):
        transitions.change_state("u1", State.STARTING, State.DRAINING)
    assert store.get("u1").state == State.STARTING and len(store.history("u1")) == 1  # the insert's


async def test_force_state_records_what_is_true_outside_the_graph(machine):
    transitions, store = machine
    transitions.force_state(store.get("u1"), State.STANDBY, "recovered")
    row = store.get("u1")
    assert row.state == State.STANDBY and row.standby_tier == "cold" and row.stopped_at is not None


async def test_wait_for_returns_once_the_state_is_reached_or_at_the_deadline(machine):
    transitions, _ = machine
    seen: list[str] = []

    def running(row: InstanceRow) -> bool:
        seen.append(row.state)
        return row.state == State.RUNNING
    waiting = asyncio.ensure_future(transitions.wait_for("shop", running, 5))
    await until(lambda: seen == [State.STARTING], what="the waiter to look once and wait")
    transitions.change_state("u1", State.STARTING, State.RUNNING, "created")
    await transitions.notify()
    assert (await waiting).state == State.RUNNING
    assert (await transitions.wait_for("shop", lambda r: False, 0.01)).state == State.RUNNING
