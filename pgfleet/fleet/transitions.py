"""The state machine at work: every lifecycle transition goes through `change_state`, which
checks it against the graph (pgfleet.fleet.states) and commits it to the store before the
caller acts on it; then tells operators (an event) and whoever waits for a state."""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from pgfleet.store import InstanceRow, Store

from . import states
from .events import EventLog
from .states import COLD, State


class Transitions:
    def __init__(self, store: Store, events: EventLog, lookup: Callable[[str], InstanceRow]) -> None:
        self.store = store
        self.events = events
        self._lookup = lookup  # a name or uuid to its row (raises NotFound)
        self._changed = asyncio.Condition()

    def change_state(self, uuid: str, from_state: str, to_state: State, reason: str | None = None, *,
                     tier: str | None = None, durable: bool = True, **changes) -> None:
        """Every lifecycle transition: legal in the state machine, committed before acting.
        `tier`: the standby tier being left (warm standby may thaw or go cold)."""
        states.check(State(from_state), to_state, tier)
        self.store.transition(uuid, from_state, to_state, reason, durable=durable, **changes)
        self._emit(uuid, from_state, to_state, reason)

    def force_state(self, row: InstanceRow, target: State, reason: str) -> None:
        """Recovery only: after a crash the stored state (say `draining`) may name a step
        that no process is taking any more; this records what is true, outside the graph."""
        self.store.transition(row.uuid, row.state, target, reason, stopped_at=time.time(),
                              standby_tier=COLD if target == State.STANDBY else None)
        self._emit(row.uuid, row.state, target, reason)

    def _emit(self, uuid: str, from_state: str, to_state: str, reason: str | None) -> None:
        row = self.store.get(uuid)
        self.events.emit("transition", row.name if row else None, uuid=uuid, **{"from": str(from_state)},
                         to=str(to_state), reason=reason)

    # --- waiting for states ---------------------------------------------------------
    async def notify(self) -> None:
        """Wake every wait_for(): some database's state changed."""
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, ref: str, predicate: Callable[[InstanceRow], bool], timeout_s: float) -> InstanceRow:
        """The database's row once `predicate` holds, or as it is when `timeout_s` runs out."""
        deadline = time.monotonic() + timeout_s
        async with self._changed:
            while True:
                row = self._lookup(ref)
                if predicate(row):
                    return row
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return row
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
