"""Backups, branches and point-in-time restore.

Every database has a repository under the home, `backups/<uuid>/`, that only root writes:
`wal/` (its archived WAL, moved there by the driver) and `base/<label>/` (base backups:
`data/` and `backup.json`). The restore window of a database runs from its oldest kept base
backup to now (running), its last stop (standby, stopped) or its deletion. A deleted
database's repository stays for its retention period, so it can still be branched from.

A branch is a new database made through Fleet.create with a `populate` step of ours instead
of a template clone: a consistent copy of the parent now, or a base backup plus WAL replayed
to a moment. Its tenant role is renamed to the branch's own name and it gets its own password.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pgfleet.drivers.base import Backend, InstanceSpec, RecoveryTarget
from pgfleet.store import InstanceRow

from .errors import InvalidRequest, NotFound, Unavailable
from .names import validate_name
from .periodic import Chore
from .states import State

log = logging.getLogger(__name__)

DAY_S = 86_400
DEFAULT_RETENTION_S = 7 * DAY_S
DEFAULT_BASE_BACKUP_INTERVAL_S = DAY_S
POLL_S = 10.0
MAX_BASE_BACKUPS_PER_TICK = 2  # a daemon start with many databases spreads its backups out
MAX_RETENTION_S = 366 * DAY_S

_SCHEMA = """
CREATE TABLE IF NOT EXISTS archives (
    uuid        TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL,
    retention_s INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    deleted_at  REAL
);
CREATE INDEX IF NOT EXISTS archives_name ON archives(name, deleted_at);
"""


@dataclass(frozen=True)
class Archive:
    uuid: str
    name: str
    role: str
    retention_s: int
    created_at: float
    deleted_at: float | None


@dataclass(frozen=True)
class BaseBackup:
    path: Path  # base/<label>
    label: str
    start_segment: str
    timeline: int
    consistent_at: float


class Backups:
    """The archive of every database of one fleet; attach with `Backups(fleet)`."""

    def __init__(self, fleet, retention_s: int = DEFAULT_RETENTION_S,
                 base_interval_s: float = DEFAULT_BASE_BACKUP_INTERVAL_S, poll_s: float = POLL_S) -> None:
        self.fleet = fleet
        self.root = (fleet.home / "backups").resolve()  # canonical, as Fleet.instances_root
        self.default_retention_s = retention_s
        self.base_interval_s = base_interval_s
        self._schedule = Chore(poll_s, self.tick, "backup schedule")
        self._busy: set[str] = set()  # uuids with a base backup under way
        fleet.store.db.executescript(_SCHEMA)
        fleet.backups = self

    # --- the index ----------------------------------------------------------------------
    def repo(self, uuid: str) -> Path:
        return self.root / uuid

    def _row(self, r) -> Archive:
        return Archive(r["uuid"], r["name"], r["role"], r["retention_s"], r["created_at"], r["deleted_at"])

    def archive(self, uuid: str) -> Archive | None:
        r = self.fleet.store.db.execute("SELECT * FROM archives WHERE uuid=?", (uuid,)).fetchone()
        return self._row(r) if r else None

    def archives(self) -> list[Archive]:
        return [self._row(r) for r in self.fleet.store.db.execute("SELECT * FROM archives ORDER BY created_at")]

    def find(self, ref: str) -> tuple[Archive, InstanceRow | None]:
        """A live database by name or uuid, else the most recently deleted one of that name."""
        row = self.fleet.store.by_name(ref) or self.fleet.store.get(ref)
        if row is not None:
            return self._ensure_indexed(row), row
        r = self.fleet.store.db.execute(
            "SELECT * FROM archives WHERE (name=? OR uuid=?) AND deleted_at IS NOT NULL "
            "ORDER BY deleted_at DESC LIMIT 1", (ref, ref)).fetchone()
        if r is None:
            raise NotFound(f"database {ref!r} does not exist and has no backups")
        return self._row(r), None

    def _ensure_indexed(self, row: InstanceRow) -> Archive:
        with self.fleet.store.db:
            self.fleet.store.db.execute(
                "INSERT OR IGNORE INTO archives(uuid, name, role, retention_s, created_at) VALUES (?,?,?,?,?)",
                (row.uuid, row.name, row.role, self.default_retention_s, time.time()))
            self.fleet.store.db.execute("UPDATE archives SET name=?, role=? WHERE uuid=?",
                                        (row.name, row.role, row.uuid))
        return self.archive(row.uuid)  # type: ignore[return-value]

    def set_retention(self, ref: str, retention_s: int) -> Archive:
        if not isinstance(retention_s, int) or not DAY_S // 24 <= retention_s <= MAX_RETENTION_S:
            raise InvalidRequest("retention must be from 1 hour to 366 days")
        arch, _ = self.find(ref)
        with self.fleet.store.db:
            self.fleet.store.db.execute("UPDATE archives SET retention_s=? WHERE uuid=?", (retention_s, arch.uuid))
        return self.archive(arch.uuid)  # type: ignore[return-value]

    def base_backups(self, uuid: str) -> list[BaseBackup]:
        base = self.repo(uuid) / "base"
        out = []
        for meta_path in sorted(base.glob("*/backup.json")) if base.is_dir() else []:
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            out.append(BaseBackup(meta_path.parent, meta_path.parent.name, meta["start_segment"],
                                  int(meta.get("timeline", 1)), float(meta["consistent_at"])))
        return sorted(out, key=lambda b: b.consistent_at)

    # --- fleet hooks (called by Fleet with the instance lock held) -------------------------
    def created(self, row: InstanceRow) -> None:
        self._ensure_indexed(row)
        self.fleet.spawn(self._first_base_backup(row.uuid))

    async def stopped(self, row: InstanceRow) -> None:
        """The postmaster has stopped cleanly: archive the rest of its WAL (no gap)."""
        try:
            await self.fleet.driver.archive(self.fleet.spec(row), self.repo(row.uuid), stopped=True)
        except Exception:
            log.exception("%s: archiving its WAL after the stop failed", row.name)

    async def deleting(self, row: InstanceRow) -> None:
        """Its processes are gone, its data not yet: archive the rest and keep the repository."""
        self._ensure_indexed(row)
        await self.stopped(row)
        with self.fleet.store.db:
            self.fleet.store.db.execute("UPDATE archives SET deleted_at=? WHERE uuid=?", (time.time(), row.uuid))

    def purge(self, uuid: str) -> None:
        shutil.rmtree(self.repo(uuid), ignore_errors=True)
        with self.fleet.store.db:
            self.fleet.store.db.execute("DELETE FROM archives WHERE uuid=?", (uuid,))

    # --- base backups -------------------------------------------------------------------
    async def take_base_backup(self, ref: str) -> BaseBackup:
        row = self.fleet.get(ref)
        self._ensure_indexed(row)
        async with self.fleet.rt.locked(row.uuid) as rt:  # a stopped database stays stopped, a running one running, meanwhile
            row = await self.fleet.warm.thawed_locked(self.fleet.get(row.uuid), rt, "base backup")
            if row.state not in (State.RUNNING, State.STANDBY, State.STOPPED):
                raise Unavailable(f"database {row.name!r} is {row.state}")
            return await self._base_backup_locked(row)

    async def _base_backup_locked(self, row: InstanceRow) -> BaseBackup:
        repo = self.repo(row.uuid)
        label = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        dest = repo / "base" / label
        dest.mkdir(mode=0o700, parents=True)
        try:
            meta = await self.fleet.driver.base_backup(self.fleet.spec(row), repo, dest / "data")
            from pgfleet.drivers.sandbox.archive import write_meta

            write_meta(dest / "backup.json", {**meta, "label": label, "database": row.name})
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        log.info("%s: base backup %s taken", row.name, label)
        return self.base_backups(row.uuid)[-1]

    async def _first_base_backup(self, uuid: str) -> None:
        try:
            if not self.base_backups(uuid):
                await self.take_base_backup(uuid)
        except Exception as exc:
            log.warning("first base backup of %s failed: %s", uuid, exc)

    # --- the restore window -------------------------------------------------------------
    def window(self, arch: Archive, row: InstanceRow | None) -> tuple[float | None, float | None]:
        """(from, to) unix times; `to` None means now (a running database); from None: empty."""
        backups = self.base_backups(arch.uuid)
        start = backups[0].consistent_at if backups else None
        if row is None:
            return start, arch.deleted_at
        if row.state in (State.STANDBY, State.STOPPED):
            return start, row.stopped_at
        return start, None

    def describe(self, ref: str) -> dict:
        arch, row = self.find(ref)
        start, end = self.window(arch, row)
        wal = self.repo(arch.uuid) / "wal"
        segments = [p for p in wal.iterdir()] if wal.is_dir() else []
        return {
            "name": arch.name, "uuid": arch.uuid, "deleted": row is None, "deleted_at": iso(arch.deleted_at),
            "retention_s": arch.retention_s,
            "window": {"from": iso(start), "to": iso(end) if end is not None else ("now" if start else None)},
            "base_backups": [{"label": b.label, "consistent_at": iso(b.consistent_at), "timeline": b.timeline}
                             for b in self.base_backups(arch.uuid)],
            "wal_files": len(segments), "wal_bytes": sum(p.stat().st_size for p in segments),
        }

    # --- the schedule -----------------------------------------------------------------------
    def start(self) -> None:
        self._schedule.start()

    async def close(self) -> None:
        await self._schedule.close()

    async def tick(self, now: float | None = None) -> None:
        """One round: archive what running databases handed over, take due base backups,
        drop what retention allows."""
        now = time.time() if now is None else now
        due = MAX_BASE_BACKUPS_PER_TICK
        for row in self.fleet.page(state=State.RUNNING):  # not every row of a 10,000-database host
            if not row.deleting:
                try:
                    await self.fleet.driver.archive(self.fleet.spec(row), self.repo(row.uuid), stopped=False)
                except Exception as exc:
                    log.warning("%s: archiving failed: %s", row.name, exc)
                backups = self.base_backups(row.uuid)
                if due > 0 and (not backups or now - backups[-1].consistent_at >= self.base_interval_s):
                    due -= 1
                    await self._base_backup_safely(row.uuid)
        for arch in self.archives():
            if arch.deleted_at is not None and now - arch.deleted_at > arch.retention_s:
                log.info("%s: deleted %.0f days ago, removing its backups", arch.name, (now - arch.deleted_at) / DAY_S)
                self.purge(arch.uuid)
                continue
            self.prune(arch, now)

    async def _base_backup_safely(self, uuid: str) -> None:
        if uuid in self._busy:
            return
        self._busy.add(uuid)
        try:
            await self.take_base_backup(uuid)
        except Exception as exc:
            log.warning("scheduled base backup of %s failed: %s", uuid, exc)
        finally:
            self._busy.discard(uuid)

    def prune(self, arch: Archive, now: float) -> None:
        """Keep the newest base backup that is older than the retention (it opens the window)
        and every newer one; WAL older than the oldest kept backup goes."""
        backups = self.base_backups(arch.uuid)
        horizon = now - arch.retention_s
        older = [b for b in backups if b.consistent_at <= horizon]
        for b in older[:-1]:
            shutil.rmtree(b.path, ignore_errors=True)
        kept = backups[len(older) - 1:] if older else backups
        if not kept:
            return
        oldest = kept[0].start_segment[8:]
        wal = self.repo(arch.uuid) / "wal"
        for p in wal.iterdir() if wal.is_dir() else []:
            seg = p.name.split(".")[0]
            if len(seg) == 24 and seg[8:] < oldest:
                p.unlink(missing_ok=True)


class Branches:
    """`db branch` and `db restore` on top of Fleet.create and the backups."""

    def __init__(self, fleet, backups: Backups) -> None:
        self.fleet = fleet
        self.backups = backups

    async def branch(self, parent_ref: str, name: str, *, at: float | None = None, lsn: str | None = None,
                     password: str | None = None):
        validate_name(name)
        if at is not None and lsn is not None:
            raise InvalidRequest("give either a time (at) or an LSN, not both")
        arch, parent = self.backups.find(parent_ref)
        if self.fleet.find(name) is not None:
            from .errors import AlreadyExists

            raise AlreadyExists(f"database {name!r} already exists")
        template = parent or self.fleet.store.get(arch.uuid)
        settings = _settings_of(template) if template is not None else {}
        if at is None and lsn is None:
            if parent is None:
                raise NotFound(f"database {parent_ref!r} was deleted: branch from a moment of its "
                               f"restore window with --at")
            populate = lambda spec: self._populate_now(parent, spec)  # noqa: E731
        else:
            target = self._target(arch, parent, at, lsn)
            populate = lambda spec: self._populate_at(arch, parent, spec, target)  # noqa: E731
        return await self.fleet.create(name, password=password, populate=populate, **settings)

    async def restore(self, ref: str, at: float):
        """Restore `ref` in place to `at`; the state it had is kept as a branch (returned)."""
        row = self.fleet.get(ref)
        arch = self.backups._ensure_indexed(row)
        target = self._target(arch, row, at, None)
        temp = f"{row.name[:40]}-restoring-{int(time.time()) % 100000:05d}"
        keep = f"{row.name[:38]}-before-{time.strftime('%Y%m%d%H%M%S', time.gmtime())}"
        if self.fleet.find(keep) is not None:
            raise InvalidRequest(f"a database {keep!r} exists already; try again in a second")
        created = await self.fleet.create(
            temp, role=row.role, verifier=row.verifier, **_settings_of(row),
            populate=lambda spec: self._populate_at(arch, row, spec, target, database=row.name))
        store = self.fleet.store
        with store.db:
            store.db.execute("BEGIN IMMEDIATE")
            store.db.execute("UPDATE instances SET name=? WHERE uuid=?", (keep, row.uuid))
            store.db.execute("UPDATE instances SET name=? WHERE uuid=?", (row.name, created.row.uuid))
        for uuid in (row.uuid, created.row.uuid):
            self.backups._ensure_indexed(self.fleet.store.get(uuid))  # type: ignore[arg-type]
        # the old state's clients leave; their next connection reaches the restored database
        await self.fleet.suspend(row.uuid, reason="replaced by a restore", drain_timeout_s=0)
        for callback in self.fleet.on_delete:
            callback(row.uuid)  # proxies drop pooled connections to the replaced state
        return self.fleet.get(created.row.uuid), self.fleet.get(row.uuid)

    def _target(self, arch: Archive, row: InstanceRow | None, at: float | None, lsn: str | None) -> RecoveryTarget:
        start, end = self.backups.window(arch, row)
        if start is None:
            raise InvalidRequest(f"database {arch.name!r} has no base backup yet: its restore window is empty")
        if lsn is not None:
            from pgfleet.drivers.sandbox.archive import parse_lsn

            try:
                return RecoveryTarget("lsn", parse_lsn(lsn))
            except ValueError:
                raise InvalidRequest(f"invalid LSN {lsn!r}: expected e.g. 0/16B3748") from None
        assert at is not None
        now = time.time()
        if at > now:
            raise InvalidRequest(f"{iso(at)} is in the future (now is {iso(now)})")
        if at < start or (end is not None and at > end + 1):
            raise InvalidRequest(f"{iso(at)} is outside the restore window of {arch.name!r}: "
                                 f"{iso(start)} to {iso(end) if end else 'now'}")
        return RecoveryTarget("time", at)

    async def _populate_now(self, parent: InstanceRow, spec: InstanceSpec) -> Backend:
        async with self.fleet.rt.locked(parent.uuid) as rt:  # the parent is not started, suspended or deleted during the copy
            row = await self.fleet.warm.thawed_locked(self.fleet.get(parent.uuid), rt, "branch")
            if row.state not in (State.RUNNING, State.STANDBY, State.STOPPED) or row.deleting:
                raise Unavailable(f"database {row.name!r} is {row.state}")
            self.backups._ensure_indexed(row)
            backend = await self.fleet.driver.branch(self.fleet.spec(row), self.backups.repo(row.uuid), spec)
        return await self.fleet.driver.rename_role(spec, backend, parent.role, spec.role)

    async def _populate_at(self, arch: Archive, parent: InstanceRow | None, spec: InstanceSpec,
                           target: RecoveryTarget, database: str | None = None) -> Backend:
        """`database`: the name of the database inside, when not spec.name (a restore in place
        takes the restored database's name from the start)."""
        repo = self.backups.repo(arch.uuid)
        if parent is not None:
            async with self.fleet.rt.locked(parent.uuid) as rt:
                row = await self.fleet.warm.thawed_locked(self.fleet.get(parent.uuid), rt, "branch")
                if row.state == State.RUNNING:
                    await self.fleet.driver.flush_archive(self.fleet.spec(row), repo)
        backup = self._backup_for(arch, target)
        meta = json.loads((backup.path / "backup.json").read_text())
        backend = await self.fleet.driver.restore(spec, backup.path / "data", meta, repo, target)
        return await self.fleet.driver.rename_role(spec, backend, arch.role, spec.role, database)

    def _backup_for(self, arch: Archive, target: RecoveryTarget) -> BaseBackup:
        backups = self.backups.base_backups(arch.uuid)
        if target.kind == "time":
            fit = [b for b in backups if b.consistent_at <= float(target.value)]  # type: ignore[arg-type]
        else:
            from pgfleet.drivers.sandbox.archive import segment_name

            seg = segment_name(1, int(target.value))[8:]  # type: ignore[arg-type]
            fit = [b for b in backups if b.start_segment[8:] <= seg]
        if not fit:
            raise InvalidRequest(f"no base backup of {arch.name!r} precedes that point")
        return fit[-1]


def _settings_of(row: InstanceRow) -> dict:
    return dict(memory_mb=row.memory_mb, cooldown_ms=row.cooldown_ms, policy=row.stz_policy, image=row.image,
                require_tls=bool(row.require_tls), pool_size=row.pool_size,
                max_pooled_clients=row.max_pooled_clients, max_direct_clients=row.max_direct_clients)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def parse_time(text: str) -> float:
    """An ISO 8601 time (a naive one is UTC) as a unix time."""
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"invalid time {text!r}: expected ISO 8601, e.g. 2026-12-04T17:30:00Z") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()
