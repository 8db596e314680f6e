"""The `sandbox` driver: each database's postmaster runs natively, as its own unprivileged
uid, in fresh mount, PID, IPC, UTS and network namespaces (the network namespace has no
interfaces; Postgres listens only on a unix socket in the instance's private directory),
under cgroup limits. Cold standby means the postmaster has shut down: no process, no memory;
warm standby means its processes are frozen and their memory reclaimed (freeze.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from ..base import Backend, Driver, DriverError, InstanceSpec, admin_connect
from ..pgbin import PostgresInstall, find_postgres
from ..roles import MAINTENANCE_DATABASE, DatabaseNames, check_role_name, personalise_sql
from ..untrusted import write_root_file
from .. import cgroups, freeze
from ..jail import ensure_jail, ensure_zygote
from ..zygote import Zygote
from . import disk
from .backups import SandboxBackups
from .identity import SandboxIdentity
from .processes import PORT, SandboxProcesses, _Running
from .recovery import SandboxRecovery
from .storage import OverlayStorage, ensure_lower, overlay_supported
from .template import ensure_template
from .uids import UidRegistry
from .warm import SandboxWarm

log = logging.getLogger(__name__)

CGROUP_PARENT = cgroups.CGROUP_PARENT
SOCKET_ROOT = Path("/run/pgfleet")


class SandboxDriver(SandboxProcesses, SandboxWarm, SandboxRecovery, SandboxIdentity, SandboxBackups, Driver):
    """The driver's paths, provisioning, start (with personalisation), deletion and disk;
    its postmasters (processes.py), warm standby (warm.py), recovery after a restart
    (recovery.py), tenant identity (identity.py) and backups (backups.py) are mixins."""

    name = "sandbox"
    keeps_sessions_across_suspend = False
    can_provision = True
    enforces_disk_mb = True

    def __init__(self, state_dir: Path, on_exit=None, postgres_major: int | None = None,
                 cache_dir: Path | None = None) -> None:
        super().__init__(state_dir, on_exit)
        from pgfleet.config import default_cache

        self.cache_dir = cache_dir or default_cache()
        self.pg: PostgresInstall = find_postgres(postgres_major)
        self.template: Path | None = None
        self.storage: OverlayStorage | None = None
        self.jail: Path | None = None
        self.zygote: Zygote | None = None  # postgres loaded once, forked per start (zygote.py)
        self.uids = UidRegistry()
        self._uids: dict[str, int] = {}  # instance uuid -> its uid
        self.databases = DatabaseNames()  # the name of each instance's database inside
        self._log_guard: asyncio.Task | None = None
        self._stopping: set[asyncio.Task] = set()  # background stops of strays found by recover()
        self._running: dict[str, _Running] = {}
        self._scanned: dict[str, int] | None = None  # postmasters by data dir, during a recovery
        self.home_tag = _home_tag(state_dir)
        self.cgroup_parent = f"{CGROUP_PARENT}/{self.home_tag}"
        # a frozen database keeps its server sessions (warm standby)
        self.keeps_sessions_across_suspend = freeze.freezer_available()

    # --- paths ------------------------------------------------------------------
    @staticmethod
    def data_dir(spec: InstanceSpec) -> Path:
        return spec.home / "data"

    def socket_dir(self, spec: InstanceSpec) -> Path:
        # Not under the home: a unix socket path must stay within 107 bytes.
        return SOCKET_ROOT / self.home_tag / str(spec.slot)

    def is_running(self, spec: InstanceSpec) -> bool:
        """Whether this driver runs the instance's postmaster now (backups.py asks)."""
        return spec.uuid in self._running

    def log_path(self, spec: InstanceSpec) -> Path:
        return spec.home / "postgres.log"

    def backend(self, spec: InstanceSpec) -> Backend:
        return Backend(port=PORT, socket_dir=str(self.socket_dir(spec)), database=self.databases.inside(spec))

    def _cgroup(self, spec: InstanceSpec) -> cgroups.Cgroup:
        return _cgroup_of(self.cgroup_parent, spec.uuid)

    def _freezer(self, spec: InstanceSpec) -> freeze.Freezer:
        return _freezer_of(self.cgroup_parent, spec.uuid)

    @staticmethod
    def _limits(spec: InstanceSpec) -> cgroups.CgroupLimits:
        return cgroups.CgroupLimits(memory_bytes=spec.memory_mb * 1024 * 1024, cpu_pct=spec.cpu_pct)

    # --- lifecycle --------------------------------------------------------------
    async def prepare(self) -> None:
        if os.geteuid() != 0:
            raise DriverError("the sandbox driver needs root (namespaces, cgroups, per-database uids)")
        self.template = await ensure_template(self.pg, self.cache_dir / "templates")
        lower = await ensure_lower(self.template) if overlay_supported() else None
        self.storage = OverlayStorage(lower)
        self.jail = await ensure_jail(self.cache_dir)
        library = await ensure_zygote(self.cache_dir)
        if library is not None and self.zygote is None:
            self.zygote = Zygote(self.pg.postgres, library)
            self.zygote.start()
        log.info("%s", await asyncio.to_thread(cgroups.favor_migrations))  # at most one remount, logged

    async def create(self, spec: InstanceSpec) -> Backend:
        await self.provision(spec)
        return await self.start(spec)

    async def provision(self, spec: InstanceSpec) -> None:
        """The database's data directory, without starting it: an overlay over the template
        (a few directories: ~1 ms), or a full copy where overlayfs is missing. Its role is
        made at its first start."""
        try:
            check_role_name(spec.role)
        except ValueError as exc:
            raise DriverError(str(exc)) from None
        if self.storage is None:
            await self.prepare()
        assert self.storage is not None
        if spec.disk_mb:  # its own filesystem (disk.py), a full copy: no overlay
            await self._clone_to_own_disk(spec)
            return
        if self.storage.lower is None:
            await self._clone(spec)
            return
        # a handful of directory and file creations, the host-wide uid lock and a scan of
        # /proc: on a worker thread, so concurrent creates overlap and the proxy is not held up
        await asyncio.to_thread(lambda: self.storage.provision(spec.home, self.uid_of(spec)))

    def _personalised_marker(self, spec: InstanceSpec) -> Path:
        return spec.home / "personalised"

    async def _clone_to_own_disk(self, spec: InstanceSpec) -> None:
        """disk_mb: the data directory is the root of the database's own filesystem (disk.py),
        a copy of the template's image grown to disk_mb, handed to its uid."""
        owned = spec.home / "data.owned"  # written last: the copy is complete and its uid's
        if owned.exists():
            return
        assert self.template is not None
        uid = self.uid_of(spec)
        data = self.data_dir(spec)
        await disk.make_images(self.template, spec.home, spec.disk_mb)
        await disk.ensure_mounted_all(spec.home, data)
        await disk.move_wal(data, disk.wal_dir(spec.home))
        for top in (data, disk.wal_dir(spec.home)):
            proc = await asyncio.create_subprocess_exec("chown", "-R", f"{uid}:{uid}", str(top))
            if await proc.wait() != 0:
                raise DriverError("chown of the new data directory failed")
            os.chmod(top, 0o700)
        owned.touch()

    async def _clone(self, spec: InstanceSpec) -> None:
        data = self.data_dir(spec)
        if (data / "PG_VERSION").exists():
            return  # an earlier, interrupted create already cloned it
        uid = self.uid_of(spec)
        partial = spec.home / "data.partial"
        shutil.rmtree(partial, ignore_errors=True)
        # cp -a keeps sparse files and modes; chown hands the copy to the instance's uid.
        proc = await asyncio.create_subprocess_exec(
            "cp", "-a", "--reflink=auto", str(self.template), str(partial),
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        if proc.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise DriverError(f"cloning the template failed: {err.decode(errors='replace').strip()}")
        proc = await asyncio.create_subprocess_exec("chown", "-R", f"{uid}:{uid}", str(partial))
        if await proc.wait() != 0:
            raise DriverError("chown of the new data directory failed")
        partial.rename(data)  # atomic: a data dir either is complete or does not exist

    async def _personalise(self, spec: InstanceSpec, backend: Backend, sql: str, database: str) -> Backend:
        """Run personalise_sql (`sql`) from the maintenance database (the tenant's may be the
        one renamed); returns the backend that reaches the database inside, now `database`."""
        conn = await admin_connect(replace(backend, database=MAINTENANCE_DATABASE))
        try:
            await conn.query(sql)
        finally:
            await conn.close()
        self.databases.renamed(spec, database)
        return replace(backend, database=database)

    async def start(self, spec: InstanceSpec) -> Backend:
        backend = await self._launch(spec)
        # the database inside takes the database's name, and the tenant's role is made (or
        # brought up to date), at the first start after a create without a start, after a
        # rename (a restore in place) and whenever the role's definition changes
        sql = personalise_sql(spec.role, spec.name)
        wanted = hashlib.sha256(sql.encode()).hexdigest()
        marker = self._personalised_marker(spec)
        try:
            done = marker.read_text() == wanted and backend.database == spec.name
        except OSError:
            done = False
        if not done:
            try:
                backend = await self._personalise(spec, backend, sql, spec.name)
            except BaseException:
                await self._shutdown(spec, signal.SIGINT)
                raise
            write_root_file(marker, wanted)
        return backend

    @contextlib.contextmanager
    def data_mounted(self, spec: InstanceSpec) -> Iterator[Path]:
        """data_dir(spec) with the database's files in it meanwhile, even while it is
        stopped (its overlay is mounted for the time and unmounted after)."""
        data = self.data_dir(spec)
        if self.storage is None or spec.uuid in self._running or os.path.ismount(data):
            yield data
            return
        self.storage.mount(spec.home)
        try:
            yield data
        finally:
            if spec.uuid not in self._running:
                self.storage.unmount(spec.home)

    async def resize_disk(self, spec: InstanceSpec) -> None:
        data = self.data_dir(spec)
        await disk.ensure_mounted_all(spec.home, data)
        try:
            await disk.grow(disk.image_of(spec.home), data, spec.disk_mb)
        except disk.NeedsOffline:
            # a restart of this database: its clients reconnect (through the proxy, to the
            # same socket) once it is back
            running = spec.uuid in self._running
            if running:
                log.warning("growing the disk of %s needs it unmounted: restarting it", spec.name)
                await self._shutdown(spec, signal.SIGINT)
            await disk.unmount(data, disk.image_of(spec.home))
            await disk.grow_offline(disk.image_of(spec.home), spec.disk_mb)
            await disk.ensure_mounted_all(spec.home, data)
            if running:
                await self.start(spec)

    async def destroy(self, spec: InstanceSpec) -> None:
        await self.stop(spec)
        self._cgroup(spec).remove()
        self._freezer(spec).remove()
        try:
            uid: int | None = int((spec.home / "uid").read_text())
        except (OSError, ValueError):
            uid = None  # never got that far, or made before the host-wide registry
        if self.storage is not None:
            self.storage.unmount(spec.home)
        await disk.unmount_all(spec.home, self.data_dir(spec))
        shutil.rmtree(spec.home, ignore_errors=True)  # fd-based: never follows a tenant's symlink
        shutil.rmtree(self.socket_dir(spec), ignore_errors=True)
        if uid is not None:
            self.uids.release(uid, spec.home)
        self._uids.pop(spec.uuid, None)
        self.databases.forget(spec)

    async def disk_bytes(self, spec: InstanceSpec) -> int | None:
        if self.storage is None:
            return None
        return await asyncio.to_thread(self.storage.disk_bytes, spec.home)

    async def usage(self, spec: InstanceSpec) -> dict[str, int]:
        if spec.uuid not in self._running:
            return {"rss_bytes": 0}
        current = self._cgroup(spec).memory_current()
        return {"rss_bytes": current} if current is not None else {}

    async def close(self) -> None:
        """Remove this home's empty per-host directories (socket root, cgroup parents) so
        that homes that come and go leave nothing behind; stop the log guard (instances
        left running keep their logs until the next daemon adopts them)."""
        if self._log_guard is not None:
            self._log_guard.cancel()
        if self.zygote is not None:
            self.zygote.close()
            self.zygote = None
        sockets = SOCKET_ROOT / self.home_tag
        slots = [d for d in sockets.iterdir() if d.is_dir()] if sockets.is_dir() else []
        freezer_parent = freeze.Freezer(CGROUP_PARENT, self.home_tag).dir
        for d in [*slots, sockets, *cgroups.Cgroup(CGROUP_PARENT, self.home_tag).dirs.values(), freezer_parent]:
            try:
                d.rmdir()
            except OSError:
                pass  # still in use (instances left running on purpose), or already gone


_home_tag = cgroups.home_tag  # tests find an instance's cgroups through it


# Paths only (no state): a wake asks for them several times, and pathlib joins cost (a
# storm of 1,000 wakes spent 0.3 s of the event loop building them); recent ones are kept.
@functools.lru_cache(maxsize=2048)
def _cgroup_of(parent: str, uuid: str) -> cgroups.Cgroup:
    return cgroups.Cgroup(parent, uuid)


@functools.lru_cache(maxsize=2048)
def _freezer_of(parent: str, uuid: str) -> freeze.Freezer:
    return freeze.Freezer(parent, uuid)
