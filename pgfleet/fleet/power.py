"""A database's processes up and down: wake and start, suspend (warm or cold) and stop,
and what happens when they die on their own.

Operations on one database are serialised by its lock (Runtimes.locked); concurrent wakes
share one start. Every step is a transition committed before the driver acts on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from pgfleet import settings as S
from pgfleet.drivers.base import Backend, DriverError, InstanceSpec
from pgfleet.store import InstanceRow

from .errors import InvalidRequest, Unavailable
from .quotas import admit
from .runtime import Runtime
from .standby import is_warm
from .states import COLD, WARM, State

if TYPE_CHECKING:
    from .manager import Fleet

log = logging.getLogger(__name__)

STANDBY_TIERS = (WARM, COLD)


class Power:
    def __init__(self, fleet: "Fleet") -> None:
        self.fleet = fleet
        fleet.driver.on_exit = self._on_driver_exit

    # --- up ----------------------------------------------------------------------------
    async def ensure_running(self, ref: str, *, wake_stopped: bool = False) -> Backend:
        """The backend of a running instance, starting it if it is in standby.

        Concurrent callers share one start: they queue on the instance lock and find
        it running when their turn comes.
        """
        fleet = self.fleet
        row = fleet.get(ref)
        rt = fleet.rt.get(row.uuid)
        if row.state == State.RUNNING and rt is not None and rt.backend is not None:
            return rt.backend
        async with fleet.rt.locked(row.uuid) as rt:
            row = fleet.get(row.uuid)
            if row.deleting:
                raise Unavailable(f"database {row.name!r} is being deleted")
            if row.state == State.RUNNING and rt.backend is not None:
                return rt.backend
            if row.state == State.STOPPED and not wake_stopped:
                raise Unavailable(f"database {row.name!r} is stopped; start it first")
            if is_warm(row):
                return await fleet.warm.thaw_locked(row, rt, reason="wake")
            return await self.start_locked(row, reason="wake" if row.state == State.STANDBY else "start")

    async def resume(self, ref: str) -> InstanceRow:
        await self.ensure_running(ref, wake_stopped=True)
        return self.fleet.get(ref)

    async def start_locked(self, row: InstanceRow, reason: str) -> Backend:
        """Start a database in standby (cold) or stopped; the caller holds its lock."""
        rt = self.fleet.rt.of(row.uuid)
        if row.state == State.RUNNING and rt.backend is not None:
            return rt.backend
        if row.state not in (State.STANDBY, State.STOPPED):
            raise Unavailable(f"database {row.name!r} is {row.state}")
        async with self.fleet.start_slots:
            return await self._start_admitted(row, rt, reason)

    async def _start_admitted(self, row: InstanceRow, rt: Runtime, reason: str) -> Backend:
        fleet = self.fleet
        admit(fleet, row.name, row.memory_mb)  # no await between this check and the move
        # Both moves of a start commit without waiting for the disk (they survive a daemon
        # crash, which recovery handles; a host crash kills every postgres anyway, and recovery
        # treats a row left in standby, starting or running without a process alike). Two
        # fsyncs fewer on a wake's critical path.
        fleet.transitions.change_state(row.uuid, row.state, State.STARTING, reason, standby_tier=None,
                                       durable=False)
        started = time.monotonic()
        try:
            backend = await fleet.driver.start(fleet.spec(row))
        except BaseException as exc:
            fleet.transitions.change_state(row.uuid, State.STARTING, State.STANDBY, f"start failed: {exc}",
                                           stop_reason="start failed", stopped_at=time.time(), standby_tier=COLD)
            await fleet.transitions.notify()
            if isinstance(exc, DriverError):
                raise Unavailable(f"database {row.name!r} failed to start: {exc}") from exc
            raise
        took = time.monotonic() - started
        fleet.transitions.change_state(
            row.uuid, State.STARTING, State.RUNNING, reason, started_at=time.time(),
            start_count=row.start_count + 1, boot_time_us=int(took * 1e6),
            stop_reason=None, durable=False,
        )
        if reason == "wake":
            fleet.telemetry.wake(row.uuid, time.time(), took)
            fleet.events.emit("wake", row.name, latency_ms=round(took * 1000, 1))
        rt.backend = backend
        rt.last_active = time.monotonic()
        fleet.scaling.arm_idle_timer(row.uuid)
        await fleet.transitions.notify()
        return backend

    # --- down --------------------------------------------------------------------------
    async def suspend(self, ref: str, *, reason: str = "suspend", drain_timeout_s: float = S.DEFAULT_DRAIN_TIMEOUT_S,
                      only_if_idle: bool = False, tier: str = COLD, if_unused: bool = False) -> InstanceRow:
        """Scale to zero now: cold (stopped), or warm (frozen; refused while a session is busy).
        `if_unused`: leave it running if a session is in use; `only_if_idle`: also if it has
        been idle for less than its cooldown."""
        if tier not in STANDBY_TIERS:
            raise InvalidRequest(f"standby tier must be one of {', '.join(STANDBY_TIERS)}")
        if tier == WARM:
            return await self._suspend_warm(ref, reason)
        return await self._shut(ref, State.STANDBY, reason, drain_timeout_s, only_if_idle, if_unused)

    async def _suspend_warm(self, ref: str, reason: str) -> InstanceRow:
        fleet = self.fleet
        row = fleet.get(ref)
        if fleet.warm.mode is None:
            raise InvalidRequest(f"the {fleet.driver.name} driver has no warm standby on this host")
        if is_warm(row):
            return row
        if row.state != State.RUNNING:
            raise Unavailable(f"database {row.name!r} is {row.state}")
        if not await fleet.warm.enter(row.uuid, reason, only_if_idle=False):
            raise Unavailable(f"database {row.name!r} has a busy session (a query or transaction); "
                              f"it is never frozen mid-transaction")
        return fleet.get(row.uuid)

    async def stop(self, ref: str, *, drain_timeout_s: float = S.DEFAULT_DRAIN_TIMEOUT_S) -> InstanceRow:
        return await self._shut(ref, State.STOPPED, "stop", drain_timeout_s, False)

    async def _shut(self, ref: str, target: State, reason: str, drain_timeout_s: float,
                    only_if_idle: bool, if_unused: bool = False) -> InstanceRow:
        fleet = self.fleet
        row = fleet.get(ref)
        async with fleet.rt.locked(row.uuid) as rt:
            row = fleet.get(row.uuid)
            rt.policy = row.stz_policy
            if only_if_idle and (rt.in_use() or row.state != State.RUNNING
                                 or not rt.idle_at_least(row.cooldown_ms)):
                return row
            if if_unused and row.state == State.RUNNING and rt.in_use():
                return row
            if is_warm(row):  # an explicit cold suspend or a stop of a warm database
                await fleet.warm.cold_locked(row, rt, reason)
                row = fleet.get(row.uuid)
            if row.state in (State.STANDBY, State.STOPPED):
                if row.state != target:
                    fleet.transitions.change_state(row.uuid, row.state, target, reason)
                    await fleet.transitions.notify()
                return fleet.get(row.uuid)
            if row.state != State.RUNNING:
                raise Unavailable(f"database {row.name!r} is {row.state}")
            await self._shut_running(row, rt, target, reason, drain_timeout_s)
        return fleet.get(row.uuid)

    async def _shut_running(self, row: InstanceRow, rt: Runtime, target: State, reason: str,
                            drain_timeout_s: float) -> None:
        """running -> draining -> stopping -> `target`; the caller holds the lock."""
        fleet = self.fleet
        rt.cancel_idle_timer()
        shut_started = time.monotonic()
        fleet.transitions.change_state(row.uuid, State.RUNNING, State.DRAINING, reason)
        await fleet.transitions.notify()
        if rt.clients > 0 and drain_timeout_s > 0 and not (row.stz_policy == "idle" and reason == "idle"):
            rt.drained.clear()
            try:
                await asyncio.wait_for(rt.drained.wait(), drain_timeout_s)
            except asyncio.TimeoutError:
                log.info("%s: %d clients still connected after draining; closing them", row.name, rt.clients)
        fleet.transitions.change_state(row.uuid, State.DRAINING, State.STOPPING, reason,
                                       stop_reason="stop" if target == State.STOPPED else reason)
        await fleet.transitions.notify()
        rt.backend = None
        rt.running = False
        spec = fleet.spec(row)
        try:
            if target == State.STOPPED:
                await fleet.driver.stop(spec)
            else:
                await fleet.driver.suspend(spec)
            if fleet.backups is not None:  # scale to zero leaves no gap in the archive
                await fleet.backups.stopped(row)
        except BaseException:
            log.exception("%s: driver failed to %s", row.name, reason)
            raise
        finally:
            fleet.transitions.change_state(row.uuid, State.STOPPING, target, reason, stopped_at=time.time(),
                                           standby_tier=COLD if target == State.STANDBY else None)
            fleet.telemetry.suspended(row.uuid, time.monotonic() - shut_started)
            await fleet.transitions.notify()

    # --- died on its own -----------------------------------------------------------------
    def _on_driver_exit(self, spec: InstanceSpec, reason: str) -> None:
        self.fleet.spawn(self._handle_exit(spec.uuid, reason))

    async def _handle_exit(self, uuid: str, reason: str) -> None:
        """The instance died on its own: it becomes standby (the next client wakes it and
        Postgres recovers from its WAL); an instance that never scales to zero restarts."""
        fleet = self.fleet
        async with fleet.rt.locked(uuid) as rt:
            row = fleet.store.get(uuid)
            if row is not None and is_warm(row):  # its frozen processes died (killed): cold now
                rt.cancel_cold_timer()
                fleet.transitions.change_state(uuid, State.STANDBY, State.STANDBY, f"exited while warm: {reason}",
                                               tier=WARM, standby_tier=COLD)
                await fleet.transitions.notify()
                return
            if row is None or row.state != State.RUNNING:
                return
            rt.backend = None
            rt.running = False
            rt.cancel_idle_timer()
            fleet.transitions.change_state(uuid, State.RUNNING, State.STANDBY, f"crashed: {reason}",
                                           stop_reason="crashed", stopped_at=time.time(), standby_tier=COLD)
            await fleet.transitions.notify()
            if row.stz_policy == "off" and not fleet.closing:
                await self.start_locked(fleet.store.get(uuid), reason="restart after crash")  # type: ignore[arg-type]
