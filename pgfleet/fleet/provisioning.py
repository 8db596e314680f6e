"""Databases made, changed and removed: create (started, or laid out cold), settings,
credentials and tags, delete.

A create records the database (provisioned=0) before the driver makes it, so recovery can
roll a half-made one back; a create without a start records it only once it is complete.
A delete marks it first (the proxy then refuses it) and removes its row last.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid as uuidlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Awaitable, Callable

from pgfleet import settings as S
from pgfleet.drivers.base import Backend, InstanceSpec
from pgfleet.pgwire.scram import Verifier, generate_password
from pgfleet.store import InstanceRow

from .errors import AlreadyExists, FleetError, InvalidRequest
from .images import check_image
from .names import validate_name
from .quotas import admit
from .states import State

if TYPE_CHECKING:
    from .manager import Fleet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Created:
    row: InstanceRow
    password: str


class Provisioning:
    def __init__(self, fleet: "Fleet") -> None:
        self.fleet = fleet
        self._reserved_slots: set[int] = set()  # taken by creates not yet in the store

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
        fleet = self.fleet
        validate_name(name)
        validate_settings(memory_mb=memory_mb, cooldown_ms=cooldown_ms, policy=policy, cold_after_ms=cold_after_ms,
                          disk_mb=disk_mb, cpu_pct=cpu_pct)
        self._check_disk_supported(disk_mb)
        check_image(image)
        self._check_policy_supported(policy)
        if fleet.store.by_name(name) is not None:
            raise AlreadyExists(f"database {name!r} already exists")
        password = password or generate_password()
        if verifier is None:  # PBKDF2: ~2 ms of C on a worker thread, not on the event loop
            verifier = (await asyncio.to_thread(Verifier.from_password, password)).encode()
        # from here to the insert (first thing in _create_running) nothing awaits: the quota
        # and the slot hold for this row; _create_cold holds the slot itself and checks again
        admit(fleet, name, memory_mb, create=True)
        row = InstanceRow(
            uuid=str(uuidlib.uuid4()), name=name, slot=self._free_slot(), state=State.STARTING,
            driver=fleet.driver.name, image=image, memory_mb=memory_mb, role=role or name,
            verifier=verifier, stz_policy=policy,
            cooldown_ms=cooldown_ms, created_at=time.time(), tags=tags or {}, require_tls=int(require_tls),
            pool_size=pool_size, max_pooled_clients=max_pooled_clients, max_direct_clients=max_direct_clients,
            cold_after_ms=cold_after_ms,
            disk_mb=disk_mb, cpu_pct=cpu_pct,
        )
        if not autostart and fleet.driver.can_provision and populate is None:
            return await self._create_cold(row, password)
        boot_s = await self._create_running(row, populate)
        fleet.telemetry.created(row.uuid, boot_s)
        fleet.events.emit("created", name, latency_ms=round(boot_s * 1000, 1), memory_mb=memory_mb, image=image)
        await fleet.transitions.notify()
        if not autostart:
            await fleet.suspend(row.uuid, reason="created without autostart")
        return Created(fleet.store.get(row.uuid), password)  # type: ignore[arg-type]

    async def _create_running(self, row: InstanceRow,
                              populate: Callable[[InstanceSpec], Awaitable[Backend]] | None) -> float:
        """Record the database (provisioned=0), make and start it; seconds it took."""
        fleet = self.fleet
        try:
            fleet.store.insert(row)  # provisioned=0: recovery rolls it back if we crash now
        except Exception as exc:  # the UNIQUE constraint lost a race
            raise AlreadyExists(f"database {row.name!r} already exists") from exc
        async with fleet.rt.locked(row.uuid) as rt:
            started = time.monotonic()
            try:
                async with fleet.start_slots:
                    spec = fleet.spec(row)
                    backend = await (populate(spec) if populate is not None else fleet.driver.create(spec))
            except BaseException as exc:
                await self._rollback_create(row, exc)
                raise
            boot_s = time.monotonic() - started
            boot_us = int(boot_s * 1e6)
            fleet.transitions.change_state(
                row.uuid, State.STARTING, State.RUNNING, "created", provisioned=1,
                started_at=time.time(), start_count=1, boot_time_us=boot_us,
            )
            rt.backend = backend
            rt.last_active = time.monotonic()  # the cooldown counts from running, not from the create call
            fleet.scaling.arm_idle_timer(row.uuid)
            if fleet.backups is not None:
                fleet.backups.created(row)
        return boot_s

    async def _create_cold(self, row: InstanceRow, password: str) -> Created:
        """Create without starting: the driver lays out the data (no Postgres start), then
        ONE commit records the database complete, in standby; its first connection wakes it.
        Nothing to undo is recorded first: a crash in between leaves only a directory with no
        row, which recovery removes (remove_orphan). No global lock: concurrent creates share
        only SQLite's short write transaction (the slot is held in memory meanwhile)."""
        fleet = self.fleet
        started = time.monotonic()
        spec = fleet.spec(row)
        self._reserved_slots.add(row.slot)
        try:
            try:
                await fleet.driver.provision(spec)
            except BaseException as exc:
                log.error("creating %s failed: %s", row.name, exc)
                fleet.events.emit("create_failed", row.name, error=str(exc)[:500])
                await asyncio.shield(fleet.driver.destroy(spec))
                raise
            row.state, row.provisioned = State.STANDBY, 1
            row.stopped_at, row.stop_reason = time.time(), "created without autostart"
            try:
                admit(fleet, row.name, row.memory_mb, create=True)  # again: others may have been created meanwhile
                fleet.store.insert(row)
            except Exception as exc:
                await asyncio.shield(fleet.driver.destroy(spec))
                if isinstance(exc, FleetError):
                    raise
                raise AlreadyExists(f"database {row.name!r} already exists") from exc  # lost a race
        finally:
            self._reserved_slots.discard(row.slot)
        # an event but no per-database telemetry object: untouched databases cost no memory
        fleet.events.emit("created", row.name, latency_ms=round((time.monotonic() - started) * 1000, 1),
                          memory_mb=row.memory_mb, image=row.image, started=False)
        await fleet.transitions.notify()
        return Created(row, password)

    async def _rollback_create(self, row: InstanceRow, exc: BaseException) -> None:
        fleet = self.fleet
        log.error("creating %s failed, rolling back: %s", row.name, exc)
        fleet.events.emit("create_failed", row.name, error=str(exc)[:500])
        try:
            await asyncio.shield(fleet.driver.destroy(fleet.spec(row)))
        finally:
            fleet.store.delete(row.uuid)
            fleet.rt.drop(row.uuid)

    def _check_policy_supported(self, policy: str | None) -> None:
        if policy == "idle" and not self.fleet.driver.keeps_sessions_across_suspend:
            raise InvalidRequest(
                f"scale-to-zero policy 'idle' needs sessions that survive a suspend, which the "
                f"{self.fleet.driver.name} driver cannot keep; use 'on' (or the microvm driver)"
            )

    def _check_disk_supported(self, disk_mb: int | None) -> None:
        if disk_mb and not self.fleet.driver.enforces_disk_mb:
            raise InvalidRequest(f"disk_mb is not enforced by the {self.fleet.driver.name} driver; leave it 0")

    def _free_slot(self) -> int:
        used = self.fleet.store.used_slots() | self._reserved_slots
        slot = 1
        while slot in used:
            slot += 1
        return slot

    async def delete(self, ref: str) -> InstanceRow:
        fleet = self.fleet
        row = fleet.get(ref)
        fleet.store.update(row.uuid, deleting=1)  # from now on the proxy refuses it (57P03)
        async with fleet.rt.locked(row.uuid) as rt:
            rt.cancel_idle_timer()
            rt.cancel_cold_timer()
            rt.backend = None
            if fleet.backups is not None:  # its backups outlive it: archive its last WAL first
                await fleet.driver.stop(fleet.spec(row))
                await fleet.backups.deleting(row)
            await fleet.driver.destroy(fleet.spec(row))
            fleet.store.delete(row.uuid)
            fleet.rt.drop(row.uuid)
        for callback in fleet.on_delete:
            callback(row.uuid)
        fleet.telemetry.forget(row.uuid)
        fleet.events.emit("deleted", row.name)
        await fleet.transitions.notify()
        return row

    async def rotate_password(self, ref: str, password: str | None = None) -> tuple[InstanceRow, str]:
        fleet = self.fleet
        row = fleet.get(ref)
        password = password or generate_password()
        verifier = await asyncio.to_thread(Verifier.from_password, password)
        fleet.store.update(row.uuid, verifier=verifier.encode())
        return fleet.get(row.uuid), password

    async def update(self, ref: str, **settings) -> InstanceRow:
        fleet = self.fleet
        row = fleet.get(ref)
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
            async with fleet.rt.locked(row.uuid):  # grown before it is recorded: never over-promised
                await fleet.driver.resize_disk(replace(fleet.spec(row), disk_mb=changes["disk_mb"]))
        fleet.store.update(row.uuid, **changes)
        fleet.scaling.arm_idle_timer(row.uuid)
        return fleet.get(row.uuid)

    def set_tags(self, ref: str, tags: dict) -> InstanceRow:
        fleet = self.fleet
        row = fleet.get(ref)
        fleet.store.update(row.uuid, tags=tags)
        return fleet.get(row.uuid)


#: the integer settings validate_settings checks, in order: bounds, what 0 means where it
#: is allowed, and a note for the error
_BOUNDED: tuple[tuple[str, S.Bounds, str, str], ...] = (
    ("cpu_pct", S.CPU_PCT, "no cap", ""),
    ("disk_mb", S.DISK_MB, "no limit", ""),
    ("memory_mb", S.MEMORY_MB, "", ""),
    ("cooldown_ms", S.COOLDOWN_MS, "", " (30 days)"),
    ("cold_after_ms", S.COLD_AFTER_MS, "", " (30 days)"),
)


def validate_settings(*, policy: str | None = None, **bounded: int | None) -> None:
    """Raise InvalidRequest for the first setting out of its bounds (None: not given)."""
    unknown = set(bounded) - {name for name, *_ in _BOUNDED}
    if unknown:
        raise TypeError(f"not a database setting: {', '.join(sorted(unknown))}")
    for name, bounds, zero, note in _BOUNDED:
        value = bounded.get(name)
        if value is not None and value not in bounds:
            either = f"0 ({zero}) or " if bounds.zero_is_none else ""
            raise InvalidRequest(f"{name} must be {either}an integer from {bounds.min} to {bounds.max}{note}")
    if policy is not None and policy not in S.POLICIES:
        raise InvalidRequest(f"scale-to-zero policy must be one of {', '.join(S.POLICIES)}")
