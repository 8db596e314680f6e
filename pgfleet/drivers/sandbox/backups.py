"""The sandbox driver's side of backups and branches (see archive.py for the design).

A mixin of SandboxDriver: it needs the driver's paths (data_dir, uid_of), its way of
starting Postgres with extra settings (_launch) and its bookkeeping of running instances.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from ..base import Backend, DriverError, InstanceSpec, RecoveryTarget, admin_connect
from ..untrusted import write_root_file
from . import archive, safecopy

log = logging.getLogger(__name__)

RECOVERY_TIMEOUT_S = 900.0  # replaying a week of WAL takes a while


class SandboxBackups:
    """Methods of SandboxDriver; see Driver for what each promises."""

    supports_branches = True

    def _repo_lock(self, repo: Path) -> asyncio.Lock:
        """One archiving step at a time per repository (the schedule and a flush may meet)."""
        locks = self.__dict__.setdefault("_repo_locks", {})
        return locks.setdefault(str(repo), asyncio.Lock())

    async def archive(self, spec: InstanceSpec, repo: Path, *, stopped: bool) -> None:
        data = self.data_dir(spec)
        async with self._repo_lock(repo):
            if stopped:
                with self.data_mounted(spec):  # a stopped copy-on-write database is not mounted
                    await asyncio.to_thread(archive.ingest_after_stop, data, repo)
            else:
                await asyncio.to_thread(archive.ingest_spool, data, repo)

    async def flush_archive(self, spec: InstanceSpec, repo: Path) -> None:
        """A commit record stamped now (so that a recovery to any earlier moment finds its
        stop point), a segment switch, and that segment and all before it in `repo`."""
        conn = await admin_connect(self.backend(spec))
        try:
            await conn.query("SELECT pg_current_xact_id()")
            segment = await conn.scalar("SELECT pg_walfile_name(pg_switch_wal())")
        finally:
            await conn.close()
        await self._archive_up_to(spec, repo, segment or "")

    async def _archive_up_to(self, spec: InstanceSpec, repo: Path, last: str) -> None:
        data = self.data_dir(spec)
        async with self._repo_lock(repo):
            await asyncio.to_thread(archive.ingest_spool, data, repo)
            await asyncio.to_thread(archive.archive_from_pg_wal, data, repo, last)

    async def base_backup(self, spec: InstanceSpec, repo: Path, dest: Path) -> dict:
        """A copy-on-write database's backup is its upper layer and the name of its template
        layer (a few MB, not the 27 of a whole data directory)."""
        with self.data_mounted(spec):  # a stopped copy-on-write database is not mounted
            if self._overlay(spec):
                upper, record = self.storage.layout(spec.home).upper, self.storage.layout(spec.home).record
                meta = await self._consistent_copy(spec, repo, upper, dest, uid=None, overlay=True)
                return {**meta, "lower": json.loads(record.read_text())["lower"]}
            return await self._consistent_copy(spec, repo, self.data_dir(spec), dest, uid=None)

    def _overlay(self, spec: InstanceSpec) -> bool:
        return self.storage is not None and self.storage.is_overlay(spec.home)

    async def _consistent_copy(self, spec: InstanceSpec, repo: Path, src: Path, dest: Path, uid: int | None,
                               keep_wal: bool = False, overlay: bool = False,
                               steps: "Steps | None" = None) -> dict:
        """Copy `src` (the data directory, or a copy-on-write database's upper layer) to the
        new `dest`: online (pg_backup_start/stop around the copy: the database's clients go
        on) while it runs; a plain copy of a cleanly stopped cluster otherwise. `keep_wal`:
        the copy starts as it is (a branch): it gets the WAL it needs in its own pg_wal (a
        stopped cluster's, or the segments of the online copy straight from the parent's
        pg_wal: Postgres then replays them to the end of the backup at its first start);
        otherwise that WAL is archived into `repo` (a base backup)."""
        steps = steps or Steps()
        if not self.is_running(spec):
            exclude = archive.exclude_keeping_wal if keep_wal else archive.exclude_from_copy
            stats = await asyncio.to_thread(safecopy.copy_tree, src, dest, uid, exclude, overlay)
            _report(spec, stats)
            steps.done("copy")
            if keep_wal:
                return {"online": False}
            control = await asyncio.to_thread(archive.read_control, self.data_dir(spec))  # (mounted)
            return {"start_segment": archive.segment_name(control.timeline, control.redo_lsn),
                    "timeline": control.timeline, "consistent_at": control.time, "online": False}
        conn = await admin_connect(self.backend(spec))
        steps.done("connect")
        try:
            await conn.query("SELECT pg_backup_start('pgfleet', true)")
            steps.done("backup start (checkpoint)")
            try:
                stats = await asyncio.to_thread(safecopy.copy_tree, src, dest, uid, archive.exclude_from_copy, overlay)
            except BaseException:
                await conn.query("SELECT pg_backup_stop(false)")
                raise
            steps.done("copy")
            # never wait for the archiver (the tenant's to break): the WAL the backup needs
            # is taken from pg_wal below; pg_backup_stop has switched to a new segment
            res = await conn.query("SELECT pg_walfile_name(lsn), labelfile, spcmapfile FROM pg_backup_stop(false)")
            stop_segment, label, spcmap = res[-1].rows[0]
            steps.done("backup stop")
        finally:
            await conn.close()
        consistent_at = time.time()
        _report(spec, stats)
        _write_owned(dest / "backup_label", label or "", uid)
        if spcmap:
            _write_owned(dest / "tablespace_map", spcmap, uid)
        start_segment = archive.label_start_segment(label or "")
        if keep_wal:
            await asyncio.to_thread(archive.copy_backup_wal, src, dest, start_segment, stop_segment or "", uid)
            steps.done("wal")
            return {"online": True}
        await self._archive_up_to(spec, repo, stop_segment or "")
        tli = int(label.split("START TIMELINE:", 1)[1].split()[0]) if "START TIMELINE:" in label else 1
        return {"start_segment": start_segment, "timeline": tli, "consistent_at": consistent_at, "online": True}

    async def branch(self, parent: InstanceSpec, parent_repo: Path, child: InstanceSpec) -> Backend:
        """A copy-on-write parent (template layer + its upper layer) gets a child over the
        same template layer with a copy of its upper layer: the cost is what the parent
        changed, not its whole size. Otherwise the whole data directory is copied."""
        steps = Steps()
        try:
            return await self._branch(parent, parent_repo, child, steps)
        finally:
            log.info("%s: branch of %s: %s", child.name, parent.name, steps)

    async def _branch(self, parent: InstanceSpec, parent_repo: Path, child: InstanceSpec, steps: "Steps") -> Backend:
        uid = self.uid_of(child)
        if self._overlay(parent):
            src, ready = self.storage.layout(parent.home).upper, self._adopt_upper
            partial = self._fresh_partial(child, "upper.partial")
            lower = json.loads(self.storage.layout(parent.home).record.read_text())["lower"]
            meta = await self._consistent_copy(parent, parent_repo, src, partial, uid, keep_wal=True, overlay=True,
                                               steps=steps)
            meta["lower"] = lower
        else:
            src, ready = self.data_dir(parent), self._adopt_data
            partial = self._fresh_partial(child)
            with self.data_mounted(parent):
                meta = await self._consistent_copy(parent, parent_repo, src, partial, uid, keep_wal=True, steps=steps)
        if not meta["online"]:
            # a cleanly stopped cluster starts without syncing its files: made durable here
            # (an fsync per file, after all of them: one journal commit, not one per clone;
            # a syncfs would write back every other database's dirty pages on the file system)
            await asyncio.to_thread(safecopy.fsync_tree, partial)
            steps.done("fsync")
        # (an online copy needs no sync here: its first start is a crash recovery, which
        # syncs its data directory before replaying: by syncfs, as an fsync of every file of
        # the merged overlay, template layer included, takes a second)
        ready(child, partial, meta)
        backend = await self._launch(child, archive.SYNC_AT_RECOVERY)  # with its WAL: an online copy replays to the backup's end
        steps.done("start")
        return backend

    def _adopt_data(self, child: InstanceSpec, partial: Path, meta: dict) -> None:
        partial.rename(self.data_dir(child))

    def _adopt_upper(self, child: InstanceSpec, partial: Path, meta: dict) -> None:
        """The child's overlay layout: the parent's template layer (meta["lower"]), the
        copied upper layer, an empty work directory and mount point."""
        mine = self.storage.layout(child.home)
        for path in (mine.work, mine.data):
            path.mkdir(mode=0o700, exist_ok=True)
        write_root_file(mine.record, json.dumps({"kind": "overlay", "lower": meta["lower"]}))
        partial.rename(mine.upper)

    async def restore(self, child: InstanceSpec, backup: Path, meta: dict, repo: Path,
                      target: RecoveryTarget) -> Backend:
        layered = "lower" in meta  # an upper layer over a template layer
        if layered and not (Path(meta["lower"]) / "PG_VERSION").exists():
            raise DriverError(f"the template layer {meta['lower']} of this backup is gone")
        partial = self._fresh_partial(child, "upper.partial" if layered else "data.partial")
        stats = await asyncio.to_thread(safecopy.copy_tree, backup, partial, self.uid_of(child), None, layered)
        _report(child, stats)
        (self._adopt_upper if layered else self._adopt_data)(child, partial, meta)
        return await self._recover(child, repo, meta, target)

    async def _recover(self, child: InstanceSpec, repo: Path, meta: dict, target: RecoveryTarget) -> Backend:
        data, uid = self.data_dir(child), self.uid_of(child)
        with self.data_mounted(child):
            staged = await asyncio.to_thread(archive.stage_wal, repo, data, meta["start_segment"], uid)
            _write_owned(data / "recovery.signal", "", uid)
        log.info("%s: recovering to %s from %d WAL segments", child.name, target, staged)
        log_start = _size(self.log_path(child))
        try:
            backend = await self._launch(child, archive.recovery_args(target), RECOVERY_TIMEOUT_S)
        except DriverError:
            if target.kind != "time" or archive.RECOVERY_NOT_REACHED not in _read_from(self.log_path(child), log_start):
                raise
            # every commit in the archive is older than the target: the state at the target
            # is the end of the WAL
            backend = await self._launch(child, archive.recovery_args(RecoveryTarget("end")), RECOVERY_TIMEOUT_S)
        await asyncio.to_thread(safecopy.remove_tree, data / archive.RESTORE_WAL)
        return backend

    async def rename_role(self, spec: InstanceSpec, backend: Backend, old: str, new: str,
                          database: str | None = None) -> Backend:
        from pgfleet.pgwire.client import quote_literal

        from ..roles import personalise_sql

        # roles are the cluster's: renamed from the maintenance database, where the database
        # the copy holds (its parent's name, or the template's) is renamed too; one connection,
        # one transaction with the personalisation
        rename = ""
        if old != new:
            aside = new + "_" + os.urandom(4).hex()
            rename = (  # a role the tenant made with the branch's name is moved aside first
                "DO $pgfleet_rename$ BEGIN "
                f"IF EXISTS (SELECT FROM pg_roles WHERE rolname = {quote_literal(new)}) THEN "
                f"EXECUTE format('ALTER ROLE %I RENAME TO %I', {quote_literal(new)}, {quote_literal(aside)}); END IF; "
                f"IF EXISTS (SELECT FROM pg_roles WHERE rolname = {quote_literal(old)}) THEN "
                f"EXECUTE format('ALTER ROLE %I RENAME TO %I', {quote_literal(old)}, {quote_literal(new)}); END IF; "
                "END $pgfleet_rename$;")
        # exactly the tenant's attributes, whatever the copy held
        database = database or spec.name
        return await self._personalise(spec, backend, rename + personalise_sql(new, database), database)

    def _fresh_partial(self, child: InstanceSpec, name: str = "data.partial") -> Path:
        if (self.data_dir(child) / "PG_VERSION").exists() or (child.home / "upper").exists():
            raise DriverError(f"database {child.name} already has data")
        child.home.mkdir(parents=True, exist_ok=True)
        os.chmod(child.home, 0o711)
        partial = child.home / name
        safecopy.remove_tree(partial)
        return partial


class Steps:
    """How long each step of a branch took (one log line per branch: where the time goes)."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.took: list[tuple[str, float]] = []

    def done(self, what: str) -> None:
        now = time.perf_counter()
        self.took.append((what, now - self.last))
        self.last = now

    def __str__(self) -> str:
        parts = ", ".join(f"{what} {s * 1000:.0f}" for what, s in self.took)
        return f"{(self.last - self.started) * 1000:.0f} ms ({parts})"


def _write_owned(path: Path, text: str, uid: int | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, text.encode())
        if uid is not None:
            os.fchown(fd, uid, uid)
    finally:
        os.close(fd)


def _report(spec: InstanceSpec, stats: safecopy.CopyStats) -> None:
    if stats.skipped:
        log.warning("%s: copy left out what is not a file or directory: %s", spec.name, ", ".join(stats.skipped[:10]))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(1 << 20).decode(errors="replace")
    except OSError:
        return ""
