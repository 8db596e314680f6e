"""The one instance state machine (Unikraft Cloud's states)."""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"  # no new sessions are handed out; waiting for clients to leave
    STOPPING = "stopping"
    STANDBY = "standby"  # scaled to zero, woken by a connection; tier warm (frozen) or cold (stopped)
    STOPPED = "stopped"  # stopped on purpose: not woken by connections


ALLOWED: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.RUNNING, State.STANDBY, State.STOPPED}),
    State.RUNNING: frozenset({State.DRAINING, State.STOPPING, State.STANDBY}),
    State.DRAINING: frozenset({State.STOPPING, State.RUNNING}),
    State.STOPPING: frozenset({State.STANDBY, State.STOPPED}),
    State.STANDBY: frozenset({State.STARTING, State.STOPPED}),
    State.STOPPED: frozenset({State.STARTING, State.STANDBY}),
}

#: standby's two tiers: warm (processes frozen, memory reclaimed, sessions kept) and cold
#: (stopped: no process, no memory). Only a warm database may skip `starting` (a thaw) or
#: go cold without leaving standby.
WARM, COLD = "warm", "cold"
ALLOWED_FROM_WARM: frozenset[State] = frozenset({State.RUNNING, State.STANDBY})

#: states in which the instance's processes may exist
LIVE = frozenset({State.STARTING, State.RUNNING, State.DRAINING, State.STOPPING})


class IllegalTransition(RuntimeError):
    pass


def check(from_state: State, to_state: State, tier: str | None = None) -> None:
    """`tier`: the standby tier the instance is leaving (from standby only)."""
    if from_state == State.STANDBY and tier == WARM and to_state in ALLOWED_FROM_WARM:
        return
    if to_state not in ALLOWED[from_state]:
        raise IllegalTransition(f"{from_state} -> {to_state} is not a legal transition")
