"""Recovery at daemon start: the store and the host brought into agreement after a
(possibly unclean) stop. What the store says is trusted only where the host agrees: a
half-made database is rolled back, a half-deleted one deleted, a running one re-attached,
and a step no process is taking any more (say `draining`) is recorded as what is true.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from pgfleet.store import InstanceRow

from . import states
from .standby import is_warm
from .states import COLD, WARM, State

if TYPE_CHECKING:
    from .manager import Fleet

log = logging.getLogger(__name__)


class Recovery:
    def __init__(self, fleet: "Fleet") -> None:
        self.fleet = fleet

    async def recover(self) -> None:
        """Bring the store and the host into agreement after a (possibly unclean) restart.

        One scan of the host tells which instances have processes; a database in standby or
        stopped without any costs nothing here (no driver call, no Runtime), so a restart
        with 10,000 defined does work only for the few that were running."""
        fleet = self.fleet
        rows = fleet.store.all()
        known = {r.uuid for r in rows}
        instances = fleet.instances_root
        for orphan in (p for p in (instances.iterdir() if instances.is_dir() else []) if p.name not in known):
            await fleet.driver.remove_orphan(orphan)  # a create without a start cut short
        alive = await fleet.driver.recover_scan([fleet.spec(r) for r in rows])
        keep_up: list[str] = []
        try:
            for row in rows:
                if (alive is not None and row.provisioned and not row.deleting
                        and State(row.state) not in states.LIVE and row.uuid not in alive):
                    if is_warm(row):  # its frozen processes are gone (a host reboot): cold
                        fleet.transitions.change_state(row.uuid, State.STANDBY, State.STANDBY,
                                                       "recovered: no process left", tier=WARM, standby_tier=COLD)
                    if row.stz_policy == "off" and row.state == State.STANDBY:
                        keep_up.append(row.uuid)
                    continue
                await self._recover_one(row, keep_up)
        finally:
            fleet.driver.recover_done()
        results = await asyncio.gather(*(fleet.ensure_running(u) for u in keep_up), return_exceptions=True)
        for uuid, res in zip(keep_up, results):
            if isinstance(res, BaseException):
                log.error("starting %s (scale to zero off) after recovery failed: %s", uuid, res)
        await fleet.transitions.notify()

    async def _recover_one(self, row: InstanceRow, keep_up: list[str]) -> None:
        fleet = self.fleet
        spec = fleet.spec(row)
        if not row.provisioned or row.deleting:  # a create or a delete cut short: it goes
            log.warning("rolling back %s: its creation never finished" if not row.provisioned
                        else "finishing the deletion of %s", row.name)
            await fleet.driver.destroy(spec)
            fleet.store.delete(row.uuid)
            return
        backend = await fleet.driver.recover(spec)
        state = State(row.state)
        if is_warm(row):
            await fleet.warm.recover(row, backend)
            return
        if backend is not None and state in (State.RUNNING, State.STARTING, State.DRAINING):
            if fleet.driver.is_frozen(spec):  # the daemon died during a thaw
                backend = await fleet.driver.thaw(spec)
            if state != State.RUNNING:
                fleet.transitions.change_state(row.uuid, state, State.RUNNING, "recovered")
            rt = fleet.rt.of(row.uuid)
            rt.backend = backend
            rt.last_active = time.monotonic()
            fleet.scaling.arm_idle_timer(row.uuid)
            log.info("re-attached to running %s", row.name)
            return
        if backend is not None:  # alive although it should not be: stop it
            await fleet.driver.suspend(spec)
        if state in states.LIVE:
            target = State.STOPPED if (state == State.STOPPING and row.stop_reason == "stop") else State.STANDBY
            fleet.transitions.force_state(row, target, "recovered after daemon restart")
        if row.stz_policy == "off" and fleet.get(row.uuid).state == State.STANDBY:
            keep_up.append(row.uuid)
