"""Standby's warm tier: a database scaled to zero with its processes frozen, not stopped.

running -> standby(warm): after `cooldown_ms` without busy sessions (or when the host needs
memory), its processes are frozen and their memory reclaimed; open client sessions stay
open. standby(warm) -> running: a thaw, about a millisecond; held sessions go on.
standby(warm) -> standby(cold): after `cold_after_ms`, when the host needs the room, or
at `pgfleet down`: a Postgres fast shutdown, as a cold suspend always was.

The freeze is recorded (durably) before it happens. The thaw is recorded before it
happens too, but without waiting for the disk: it is on the client's clock, and a host
crash, the only thing that could lose the record, leaves no process to be warm anyway.
Recovery trusts the host (is it frozen?), not the record alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Awaitable, Callable

from pgfleet.drivers.base import Backend, DriverError
from pgfleet.store import InstanceRow

from .states import COLD, WARM, State

if TYPE_CHECKING:
    from .manager import Fleet
    from .runtime import Runtime

log = logging.getLogger(__name__)

#: a second reclaim this long after a freeze: the pages its processes touched last resist
#: the first (measured: 4.4-6.3 MiB still charged right after freezing a database that had
#: been idle a while; 2.1 MiB, all kernel memory, once reclaimed again a second later)
SETTLE_S = 1.5


class WarmTier:
    def __init__(self, fleet: "Fleet") -> None:
        self.fleet = fleet
        #: called with a database's uuid as it is frozen: the pooled listener closes its idle
        #: server connections (their backends would hold memory; a new one wakes the database)
        self.on_freeze: list = []
        #: awaited with (uuid, backend) as a database is about to be frozen, its sessions
        #: held back already: the direct listener opens the session its next client takes
        self.before_freeze: list[Callable[[str, Backend], Awaitable[None]]] = []

    @property
    def mode(self) -> str | None:
        """"reclaim", "freeze" (no swap: memory stays charged) or None (cold only)."""
        return self.fleet.driver.warm_mode()

    def status(self) -> dict:
        """For `pgfleet status`: what standby does on this host, and why."""
        from pgfleet.drivers import swap

        mode = self.mode
        explain = {
            "reclaim": "warm: frozen, memory reclaimed to swap; cold after cold_after_ms or under memory pressure",
            "freeze": "warm: frozen WITHOUT reclaim (no swap: memory stays charged; `pgfleet up --swap SIZE`)",
            None: f"cold only (the {self.fleet.driver.name} driver cannot freeze here)",
        }[mode]
        return {"warm_mode": mode, "explain": explain, "swap_bytes": swap.total_bytes(),
                "zswap": swap.zswap_enabled()}

    # --- running -> warm ---------------------------------------------------------------
    async def enter(self, uuid: str, reason: str, *, only_if_idle: bool) -> bool:
        """Freeze a running database whose sessions are all idle. False if it was not
        (busy, not running, or idle for less than its cooldown with `only_if_idle`)."""
        fleet = self.fleet
        async with fleet.rt.locked(uuid) as rt:
            row = fleet.store.get(uuid)
            if row is None or row.state != State.RUNNING or row.deleting or rt.backend is None:
                return False
            rt.policy = row.stz_policy
            if rt.in_use() or (only_if_idle and not rt.idle_at_least(row.cooldown_ms)):
                return False
            # From here to the freeze a packet of an open session finds no backend and waits
            # for the thaw behind this lock, as does a new client: no query runs into the freeze.
            rt.cancel_idle_timer()
            fleet.transitions.change_state(uuid, State.RUNNING, State.STANDBY, reason, standby_tier=WARM,
                        stop_reason=reason, stopped_at=time.time())
            backend, rt.backend, rt.running = rt.backend, None, False
            for callback in self.on_freeze:
                callback(uuid)
            for prepare in self.before_freeze:
                await prepare(uuid, backend)
            try:
                charged = await fleet.driver.freeze(fleet.spec(row))
            except DriverError as exc:
                log.warning("%s: %s; going cold instead", row.name, exc)
                await self.cold_locked(fleet.store.get(uuid), rt, f"freeze failed: {exc}")  # type: ignore[arg-type]
                await fleet.transitions.notify()
                return True
            log.info("%s: warm standby (%s), %.1f MiB still charged", row.name, reason, charged / 2**20)
            self._arm_cold_timer(uuid, rt, row.cold_after_ms)
            self._arm_settle_timer(uuid, row.start_count)
        await fleet.transitions.notify()
        return True

    # --- warm -> running ---------------------------------------------------------------
    async def thaw_locked(self, row: InstanceRow, rt: "Runtime", reason: str) -> Backend:
        """Wake a warm database (the caller holds its lock). If its frozen processes are
        gone, it is started cold."""
        fleet = self.fleet
        started = time.monotonic()
        rt.cancel_cold_timer()
        fleet.transitions.change_state(row.uuid, State.STANDBY, State.RUNNING, reason, tier=WARM, durable=False,
                    standby_tier=None, stop_reason=None, started_at=time.time(), start_count=row.start_count + 1)
        spec = fleet.spec(row)
        try:
            backend = await fleet.driver.thaw(spec)
        except DriverError as exc:
            log.warning("%s: thaw failed (%s); starting it cold", row.name, exc)
            fleet.transitions.change_state(row.uuid, State.RUNNING, State.STOPPING, f"thaw failed: {exc}")
            try:
                await fleet.driver.suspend(spec)
            finally:
                fleet.transitions.change_state(row.uuid, State.STOPPING, State.STANDBY, "thaw failed", standby_tier=COLD,
                            stopped_at=time.time())
            return await fleet.power.start_locked(fleet.store.get(row.uuid), reason=reason)  # type: ignore[arg-type]
        rt.backend, rt.running = backend, True
        rt.last_active = time.monotonic()
        rt.policy, rt.cooldown_ms = row.stz_policy, row.cooldown_ms
        fleet.scaling.arm_idle_timer(row.uuid, fresh=False)  # the settings are row's: no re-read
        if reason == "wake":
            took = rt.last_active - started
            fleet.telemetry.wake(row.uuid, time.time(), took)
            fleet.events.emit("wake", row.name, latency_ms=round(took * 1000, 2), tier=WARM)
        await fleet.transitions.notify()
        return backend

    async def thawed_locked(self, row: InstanceRow, rt: "Runtime", reason: str) -> InstanceRow:
        """`row` as it is once running again if it was warm (the caller holds its lock): for
        work that must talk to its Postgres, which would wait forever on a frozen one."""
        if not is_warm(row):
            return row
        await self.thaw_locked(row, rt, reason)
        return self.fleet.get(row.uuid)

    # --- warm -> cold ------------------------------------------------------------------
    async def to_cold(self, uuid: str, reason: str, *, if_unused: bool = False) -> bool:
        """warm -> cold; `if_unused`: not while a session is busy (a query of a held session
        waiting for the thaw counts: taking it cold would end the session under its query)."""
        async with self.fleet.rt.locked(uuid) as rt:
            row = self.fleet.store.get(uuid)
            if row is None or not is_warm(row) or (if_unused and self.fleet.in_use(uuid)):
                return False
            await self.cold_locked(row, rt, reason)
        await self.fleet.transitions.notify()
        return True

    async def cold_locked(self, row: InstanceRow, rt: "Runtime", reason: str) -> None:
        """A Postgres fast shutdown (the driver thaws it first); held sessions end."""
        rt.cancel_cold_timer()
        self.fleet.transitions.change_state(row.uuid, State.STANDBY, State.STANDBY, reason, tier=WARM, standby_tier=COLD)
        await self.fleet.driver.suspend(self.fleet.spec(row))
        log.info("%s: cold standby (%s)", row.name, reason)

    def _arm_settle_timer(self, uuid: str, start_count: int) -> None:
        if not self.fleet.closing:
            asyncio.get_running_loop().call_later(
                SETTLE_S, lambda: None if self.fleet.closing else self.fleet.spawn(self._settled(uuid, start_count)))

    async def _settled(self, uuid: str, start_count: int) -> None:
        """A second reclaim once the freeze has settled, if the database is still warm from
        that freeze (never thawed since: its start count has not moved)."""
        try:
            async with self.fleet.rt.locked(uuid):
                row = self.fleet.store.get(uuid)
                if row is not None and is_warm(row) and row.start_count == start_count:
                    charged = await self.fleet.driver.reclaim_again(self.fleet.spec(row))
                    log.debug("%s: %.1f MiB still charged once settled", row.name, charged / 2**20)
        except Exception:
            log.exception("reclaiming the memory of warm %s again failed", uuid)

    def _arm_cold_timer(self, uuid: str, rt: "Runtime", after_ms: int) -> None:
        rt.cancel_cold_timer()
        if self.fleet.closing:
            return
        rt.cold_timer = asyncio.get_running_loop().call_later(
            after_ms / 1000, lambda: self.fleet.spawn(self._cold_due(uuid)))

    async def _cold_due(self, uuid: str) -> None:
        try:
            await self.to_cold(uuid, "warm for cold_after_ms")
        except Exception:
            log.exception("moving %s to cold standby failed", uuid)

    # --- daemon restart and stop -------------------------------------------------------
    async def recover(self, row: InstanceRow, backend: Backend | None) -> None:
        """After a restart: a warm database whose processes are still frozen stays warm
        (re-attached); anything else recorded warm goes cold (never a frozen orphan)."""
        fleet = self.fleet
        rt = fleet.rt.of(row.uuid)
        spec = fleet.spec(row)
        if backend is not None and fleet.driver.is_frozen(spec):
            log.info("re-attached to warm %s", row.name)
            self._arm_cold_timer(row.uuid, rt, row.cold_after_ms)
            return
        await self.cold_locked(row, rt, "recovered after daemon restart")

    async def all_to_cold(self, reason: str) -> None:
        warm = [r for r in self.fleet.store.all() if is_warm(r)]
        results = await asyncio.gather(*(self.to_cold(r.uuid, reason) for r in warm), return_exceptions=True)
        for row, res in zip(warm, results):
            if isinstance(res, BaseException):
                log.error("moving %s to cold standby failed: %s", row.name, res)


def is_warm(row: InstanceRow) -> bool:
    return row.state == State.STANDBY and row.standby_tier == WARM
