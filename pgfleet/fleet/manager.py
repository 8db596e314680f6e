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
import uuid as uuidlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Awaitable, Callable

from pgfleet import settings as S
from pgfleet.drivers.base import Backend, Driver, InstanceSpec
from pgfleet.pgwire.scram import Verifier, generate_password
from pgfleet.store import InstanceRow, Store

from . import states
from .errors import AlreadyExists, FleetError, InvalidRequest
from .events import EventLog
from .images import check_image
from .names import validate_name
from .power import Power
from .queries import Queries
from .quotas import Quotas, admit
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


@dataclass(frozen=True)
class Created:
    row: InstanceRow
    password: str


class Fleet:
    def __init__(self, store: Store, driver: Driver, home: Path, start_concurrency: int | None = None,
                 quotas: Quotas | None = None) -> None:
        self.store = store
        self.driver = driver
        self.home = home
        self.rt = Runtimes()
        self._tasks: set[asyncio.Task] = set()
        self._reserved_slots: set[int] = set()  # taken by creates not yet in the store
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

    # --- create / delete -------------------------------------------------------------
    async def create(
        self, name: str, *, memory_mb: int = S.MEMORY_MB.default, cooldown_ms: int = S.COOLDOWN_MS.default,
        policy: str = S.DEFAULT_POLICY, image: str = "postgres:15", password: str | None = None,
        autostart: bool = True, tags: dict | None = None, require_tls: bool = False,
        pool_size: int = S.POOL_SIZE.default, max_pooled_clients: int = S.MAX_POOLED_CLIENTS.default,
        max_direct_clients: int = S.MAX_DIRECT_CLIENTS.default,
        populate: Callable[[InstanceSpec], Awaitable[Backend]] | None = None, role: str | None = None,
        verifier: str | None = None,
        cold_after_ms: int = S.COLD_AFTER_MS.default,
        disk_mb: int = S.DISK_MB.default, cpu_pct: int = S.CPU_PCT.default,
    ) -> Created:
        """A new database, ready when this returns. `populate` makes its data and starts it
        instead of a template clone (branches); `role`/`verifier` keep given credentials."""
        validate_name(name)
        validate_settings(memory_mb=memory_mb, cooldown_ms=cooldown_ms, policy=policy, cold_after_ms=cold_after_ms,
                          disk_mb=disk_mb, cpu_pct=cpu_pct)
        self._check_disk_supported(disk_mb)
        check_image(image)
        self._check_policy_supported(policy)
        if self.store.by_name(name) is not None:
            raise AlreadyExists(f"database {name!r} already exists")
        password = password or generate_password()
        if verifier is None:  # PBKDF2: ~2 ms of C on a worker thread, not on the event loop
            verifier = (await asyncio.to_thread(Verifier.from_password, password)).encode()
        # from here to the insert nothing awaits: the quota and the slot hold for this row
        admit(self, name, memory_mb, create=True)
        row = InstanceRow(
            uuid=str(uuidlib.uuid4()), name=name, slot=self._free_slot(), state=State.STARTING,
            driver=self.driver.name, image=image, memory_mb=memory_mb, role=role or name,
            verifier=verifier, stz_policy=policy,
            cooldown_ms=cooldown_ms, created_at=time.time(), tags=tags or {}, require_tls=int(require_tls),
            pool_size=pool_size, max_pooled_clients=max_pooled_clients, max_direct_clients=max_direct_clients,
            cold_after_ms=cold_after_ms,
            disk_mb=disk_mb, cpu_pct=cpu_pct,
        )
        if not autostart and self.driver.can_provision and populate is None:
            return await self._create_cold(row, password)
        try:
            self.store.insert(row)  # provisioned=0: recovery rolls it back if we crash now
        except Exception as exc:  # the UNIQUE constraint lost a race
            raise AlreadyExists(f"database {name!r} already exists") from exc
        async with self.rt.locked(row.uuid) as rt:
            started = time.monotonic()
            try:
                async with self.start_slots:
                    spec = self.spec(row)
                    backend = await (populate(spec) if populate is not None else self.driver.create(spec))
            except BaseException as exc:
                await self._rollback_create(row, exc)
                raise
            boot_s = time.monotonic() - started
            boot_us = int(boot_s * 1e6)
            self.transitions.change_state(
                row.uuid, State.STARTING, State.RUNNING, "created", provisioned=1,
                started_at=time.time(), start_count=1, boot_time_us=boot_us,
            )
            rt.backend = backend
            rt.last_active = time.monotonic()  # the cooldown counts from running, not from the create call
            self.scaling.arm_idle_timer(row.uuid)
            if self.backups is not None:
                self.backups.created(row)
        self.telemetry.created(row.uuid, boot_s)
        self.events.emit("created", name, latency_ms=round(boot_s * 1000, 1), memory_mb=memory_mb, image=image)
        await self.transitions.notify()
        if not autostart:
            await self.suspend(row.uuid, reason="created without autostart")
        return Created(self.store.get(row.uuid), password)  # type: ignore[arg-type]

    async def _create_cold(self, row: InstanceRow, password: str) -> Created:
        """Create without starting: the driver lays out the data (no Postgres start), then
        ONE commit records the database complete, in standby; its first connection wakes it.
        Nothing to undo is recorded first: a crash in between leaves only a directory with no
        row, which recovery removes (remove_orphan). No global lock: concurrent creates share
        only SQLite's short write transaction (the slot is held in memory meanwhile)."""
        started = time.monotonic()
        spec = self.spec(row)
        self._reserved_slots.add(row.slot)
        try:
            try:
                await self.driver.provision(spec)
            except BaseException as exc:
                log.error("creating %s failed: %s", row.name, exc)
                self.events.emit("create_failed", row.name, error=str(exc)[:500])
                await asyncio.shield(self.driver.destroy(spec))
                raise
            row.state, row.provisioned = State.STANDBY, 1
            row.stopped_at, row.stop_reason = time.time(), "created without autostart"
            try:
                admit(self, row.name, row.memory_mb, create=True)  # again: others may have been created meanwhile
                self.store.insert(row)
            except Exception as exc:
                await asyncio.shield(self.driver.destroy(spec))
                if isinstance(exc, FleetError):
                    raise
                raise AlreadyExists(f"database {row.name!r} already exists") from exc  # lost a race
        finally:
            self._reserved_slots.discard(row.slot)
        # an event but no per-database telemetry object: untouched databases cost no memory
        self.events.emit("created", row.name, latency_ms=round((time.monotonic() - started) * 1000, 1),
                         memory_mb=row.memory_mb, image=row.image, started=False)
        await self.transitions.notify()
        return Created(row, password)

    async def _rollback_create(self, row: InstanceRow, exc: BaseException) -> None:
        log.error("creating %s failed, rolling back: %s", row.name, exc)
        self.events.emit("create_failed", row.name, error=str(exc)[:500])
        try:
            await asyncio.shield(self.driver.destroy(self.spec(row)))
        finally:
            self.store.delete(row.uuid)
            self.rt.drop(row.uuid)

    def _check_policy_supported(self, policy: str | None) -> None:
        if policy == "idle" and not self.driver.keeps_sessions_across_suspend:
            raise InvalidRequest(
                f"scale-to-zero policy 'idle' needs sessions that survive a suspend, which the "
                f"{self.driver.name} driver cannot keep; use 'on' (or the microvm driver)"
            )

    def _check_disk_supported(self, disk_mb: int | None) -> None:
        if disk_mb and not self.driver.enforces_disk_mb:
            raise InvalidRequest(f"disk_mb is not enforced by the {self.driver.name} driver; leave it 0")

    def _free_slot(self) -> int:
        used = self.store.used_slots() | self._reserved_slots
        slot = 1
        while slot in used:
            slot += 1
        return slot

    async def delete(self, ref: str) -> InstanceRow:
        row = self.get(ref)
        self.store.update(row.uuid, deleting=1)  # from now on the proxy refuses it (57P03)
        async with self.rt.locked(row.uuid) as rt:
            rt.cancel_idle_timer()
            rt.cancel_cold_timer()
            rt.backend = None
            if self.backups is not None:  # its backups outlive it: archive its last WAL first
                await self.driver.stop(self.spec(row))
                await self.backups.deleting(row)
            await self.driver.destroy(self.spec(row))
            self.store.delete(row.uuid)
            self.rt.drop(row.uuid)
        for callback in self.on_delete:
            callback(row.uuid)
        self.telemetry.forget(row.uuid)
        self.events.emit("deleted", row.name)
        await self.transitions.notify()
        return row

    async def rotate_password(self, ref: str, password: str | None = None) -> tuple[InstanceRow, str]:
        row = self.get(ref)
        password = password or generate_password()
        verifier = await asyncio.to_thread(Verifier.from_password, password)
        self.store.update(row.uuid, verifier=verifier.encode())
        return self.get(row.uuid), password

    async def update(self, ref: str, **settings) -> InstanceRow:
        row = self.get(ref)
        changes = {k: v for k, v in settings.items() if v is not None}
        validate_settings(**changes)
        self._check_policy_supported(changes.get("policy"))
        if "policy" in changes:
            changes["stz_policy"] = changes.pop("policy")
        if changes.get("disk_mb", row.disk_mb) != row.disk_mb:
            self._check_disk_supported(changes["disk_mb"])
            if row.disk_mb == 0:
                raise InvalidRequest("disk_mb can only be set when a database is created")
            if changes["disk_mb"] < row.disk_mb:
                raise InvalidRequest(f"disk_mb can only grow (it is {row.disk_mb})")
            async with self.rt.locked(row.uuid):  # grown before it is recorded: never over-promised
                await self.driver.resize_disk(replace(self.spec(row), disk_mb=changes["disk_mb"]))
        self.store.update(row.uuid, **changes)
        self.scaling.arm_idle_timer(row.uuid)
        return self.get(row.uuid)

    def set_tags(self, ref: str, tags: dict) -> InstanceRow:
        row = self.get(ref)
        self.store.update(row.uuid, tags=tags)
        return self.get(row.uuid)

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


def validate_settings(*, memory_mb: int | None = None, cooldown_ms: int | None = None,
                      policy: str | None = None, cold_after_ms: int | None = None,
                      disk_mb: int | None = None, cpu_pct: int | None = None) -> None:
    if cpu_pct is not None and cpu_pct not in S.CPU_PCT:
        raise InvalidRequest(f"cpu_pct must be 0 (no cap) or an integer from {S.CPU_PCT.min} to {S.CPU_PCT.max}")
    if disk_mb is not None and disk_mb not in S.DISK_MB:
        raise InvalidRequest(f"disk_mb must be 0 (no limit) or an integer from {S.DISK_MB.min} to {S.DISK_MB.max}")
    if memory_mb is not None and memory_mb not in S.MEMORY_MB:
        raise InvalidRequest(f"memory_mb must be an integer from {S.MEMORY_MB.min} to {S.MEMORY_MB.max}")
    if cooldown_ms is not None and cooldown_ms not in S.COOLDOWN_MS:
        raise InvalidRequest(f"cooldown_ms must be an integer from {S.COOLDOWN_MS.min} to {S.COOLDOWN_MS.max} (30 days)")
    if cold_after_ms is not None and cold_after_ms not in S.COLD_AFTER_MS:
        raise InvalidRequest(f"cold_after_ms must be an integer from {S.COLD_AFTER_MS.min} to {S.COLD_AFTER_MS.max} (30 days)")
    if policy is not None and policy not in S.POLICIES:
        raise InvalidRequest(f"scale-to-zero policy must be one of {', '.join(S.POLICIES)}")
