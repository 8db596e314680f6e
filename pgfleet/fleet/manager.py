"""The fleet: instance lifecycle on one host.

It owns the state machine: every transition is committed to the store before the driver
is asked to act, lifecycle operations on one instance are serialised by its lock, and a
connection to a standby database wakes it exactly once however many clients arrive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Callable

from pgfleet.drivers.base import Driver, InstanceSpec
from pgfleet.store import InstanceRow, Store

from . import states
from .events import EventLog
from .power import Power
from .provisioning import Provisioning
from .queries import Queries
from .quotas import Quotas
from .runtime import Runtimes
from .scaling import ScaleToZero
from .standby import WarmTier, is_warm
from .states import COLD, WARM, State
from .telemetry import Telemetry
from .transitions import Transitions

log = logging.getLogger(__name__)


def default_start_concurrency() -> int:
    """Starts at once: a Postgres start is ~20-40 ms of CPU, so more than two per core
    only makes every one of them slower; the rest wait their turn in a FIFO queue."""
    return 2 * (os.cpu_count() or 1)


class Fleet:
    def __init__(self, store: Store, driver: Driver, home: Path, start_concurrency: int | None = None,
                 quotas: Quotas | None = None) -> None:
        self.store = store
        self.driver = driver
        self.home = home
        self.rt = Runtimes()
        self._tasks: set[asyncio.Task] = set()
        #: admission of starts (wakes and creates): bounded, first come first served, so a
        #: storm of wakes queues instead of thrashing and every database gets its turn
        self.start_slots = asyncio.Semaphore(start_concurrency or default_start_concurrency())
        self.closing = False
        #: admission control, checked on every path that makes a database live (create and
        #: every start: wake, resume, the UKC routes, Kubernetes); None: the defaults
        self.quotas = quotas if quotas is not None else Quotas()
        #: the host memory manager (pgfleet.fleet.memory), when the daemon runs one
        self.memory = None
        #: called with a database's uuid once it is deleted (proxies drop their pools)
        self.on_delete: list[Callable[[str], None]] = []
        #: what operators see: structured events (log, ring, followers) and lifecycle numbers
        self.events = EventLog()
        self.telemetry = Telemetry()
        self.queries = Queries(self)
        self.list = self.queries.list
        self.page = self.queries.page
        self.count_by_state = self.queries.count_by_state
        self.get = self.queries.get
        self.find = self.queries.find
        self.find_uuid = self.queries.find_uuid
        self.history = self.queries.history
        self.quota_usage = self.queries.quota_usage
        self.usage = self.queries.usage
        self.disk_bytes = self.queries.disk_bytes
        self.memory_charged = self.queries.memory_charged
        self.log_path = self.queries.log_path
        self.transitions = Transitions(store, self.events, self.get)
        # what the proxy and the API read on every message, bound once
        self.backend_of = self.rt.backend_of
        self.is_known = self.rt.is_known
        self.is_up = self.rt.is_up
        self.sessions = self.rt.sessions
        self.wait_for = self.transitions.wait_for
        self.scaling = ScaleToZero(self)
        self.lease = self.scaling.lease
        self.session_busy = self.scaling.session_busy
        self.in_use = self.scaling.in_use
        #: continuous archiving (pgfleet.fleet.branches.Backups attaches itself), or None
        self.backups = None
        self.power = Power(self)
        self.ensure_running = self.power.ensure_running
        self.resume = self.power.resume
        self.suspend = self.power.suspend
        self.stop = self.power.stop
        self.warm = WarmTier(self)
        self.provisioning = Provisioning(self)
        self.create = self.provisioning.create
        self.delete = self.provisioning.delete
        self.update = self.provisioning.update
        self.rotate_password = self.provisioning.rotate_password
        self.set_tags = self.provisioning.set_tags

    # --- what every part shares ----------------------------------------------------------
    @property
    def keeps_sessions_across_suspend(self) -> bool:
        """Whether the driver keeps sessions open across a suspend (the `idle` policy needs it)."""
        return self.driver.keeps_sessions_across_suspend

    @property
    def driver_name(self) -> str:
        return self.driver.name

    def data_path(self, row: InstanceRow) -> Path:
        """The directory holding everything of one database (its volume)."""
        return self.home / "instances" / row.uuid

    def spec(self, row: InstanceRow) -> InstanceSpec:
        return InstanceSpec(
            uuid=row.uuid, name=row.name, role=row.role, memory_mb=row.memory_mb,
            slot=row.slot, home=self.data_path(row), vcpus=row.vcpus, disk_mb=row.disk_mb,
            cpu_pct=row.cpu_pct,
        )

    # --- daemon tasks ----------------------------------------------------------------------
    def spawn(self, coro) -> None:
        """Run `coro` in the background until it ends or the daemon stops."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- daemon start and stop -----------------------------------------------------------
    async def recover(self) -> None:
        """Bring the store and the host into agreement after a (possibly unclean) restart.

        One scan of the host tells which instances have processes; a database in standby or
        stopped without any costs nothing here (no driver call, no Runtime), so a restart
        with 10,000 defined does work only for the few that were running."""
        rows = self.store.all()
        known = {r.uuid for r in rows}
        instances = self.home / "instances"
        for orphan in (p for p in (instances.iterdir() if instances.is_dir() else []) if p.name not in known):
            await self.driver.remove_orphan(orphan)  # a create without a start cut short
        alive = await self.driver.recover_scan([self.spec(r) for r in rows])
        keep_up: list[str] = []
        try:
            for row in rows:
                if (alive is not None and row.provisioned and not row.deleting
                        and State(row.state) not in states.LIVE and row.uuid not in alive):
                    if is_warm(row):  # its frozen processes are gone (a host reboot): cold
                        self.transitions.change_state(row.uuid, State.STANDBY, State.STANDBY, "recovered: no process left",
                                   tier=WARM, standby_tier=COLD)
                    if row.stz_policy == "off" and row.state == State.STANDBY:
                        keep_up.append(row.uuid)
                    continue
                await self._recover_one(row, keep_up)
        finally:
            self.driver.recover_done()
        results = await asyncio.gather(*(self.ensure_running(u) for u in keep_up), return_exceptions=True)
        for uuid, res in zip(keep_up, results):
            if isinstance(res, BaseException):
                log.error("starting %s (scale to zero off) after recovery failed: %s", uuid, res)
        await self.transitions.notify()

    async def _recover_one(self, row: InstanceRow, keep_up: list[str]) -> None:
        spec = self.spec(row)
        if not row.provisioned:
            log.warning("rolling back %s: its creation never finished", row.name)
            await self.driver.destroy(spec)
            self.store.delete(row.uuid)
            return
        if row.deleting:
            log.warning("finishing the deletion of %s", row.name)
            await self.driver.destroy(spec)
            self.store.delete(row.uuid)
            return
        backend = await self.driver.recover(spec)
        state = State(row.state)
        if is_warm(row):
            await self.warm.recover(row, backend)
            return
        if backend is not None and state in (State.RUNNING, State.STARTING, State.DRAINING):
            if self.driver.is_frozen(spec):  # the daemon died during a thaw
                backend = await self.driver.thaw(spec)
            if state != State.RUNNING:
                self.transitions.change_state(row.uuid, state, State.RUNNING, "recovered")
            rt = self.rt.of(row.uuid)
            rt.backend = backend
            rt.last_active = time.monotonic()
            self.scaling.arm_idle_timer(row.uuid)
            log.info("re-attached to running %s", row.name)
            return
        if backend is not None:  # alive although it should not be: stop it
            await self.driver.suspend(spec)
        if state in states.LIVE:
            target = State.STOPPED if (state == State.STOPPING and row.stop_reason == "stop") else State.STANDBY
            self.transitions.force_state(row, target, "recovered after daemon restart")
        if row.stz_policy == "off" and self.get(row.uuid).state == State.STANDBY:
            keep_up.append(row.uuid)

    async def shutdown(self) -> None:
        """Daemon exit: every running database is suspended (durably) first."""
        self.closing = True
        for rt in self.rt.values():
            rt.cancel_idle_timer()
            rt.cancel_cold_timer()
        running = [r for r in self.store.all() if r.state == State.RUNNING]
        results = await asyncio.gather(
            *(self.suspend(r.uuid, reason="daemon shutdown", drain_timeout_s=0) for r in running),
            self.warm.all_to_cold("daemon shutdown"),  # no frozen processes outlive the daemon
            return_exceptions=True,
        )
        for row, res in zip(running, results):
            if isinstance(res, BaseException):
                log.error("suspending %s at shutdown failed: %s", row.name, res)
        for task in list(self._tasks):
            task.cancel()
        await self.driver.close()
