"""The `sandbox` driver: each database's postmaster runs natively, as its own unprivileged
uid, in fresh mount, PID, IPC, UTS and network namespaces (the network namespace has no
interfaces; Postgres listens only on a unix socket in the instance's private directory),
under cgroup limits. Cold standby means the postmaster has shut down: no process, no memory;
warm standby means its processes are frozen and their memory reclaimed (freeze.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from .. import swap
from ..base import Backend, Driver, DriverError, InstanceSpec, admin_connect
from ..pgbin import PostgresInstall, find_postgres
from ..roles import MAINTENANCE_DATABASE, DatabaseNames, check_role_name, personalise_sql
from ..untrusted import read_head, read_tail, rotate_log
from . import archive, cgroups, disk, freeze
from .backups import SandboxBackups
from .jail import ensure_jail, jail_argv
from .procscan import find_postmaster, find_postmasters
from .storage import OverlayStorage, ensure_lower, mounted_data_dirs, overlay_supported
from .uids import UidRegistry
from .template import ensure_template

log = logging.getLogger(__name__)

PORT = 5432  # names the socket file only: the network namespace has no interfaces
READY_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 30.0
LOG_MAX_BYTES = 32 << 20  # per instance: postgres.log and postgres.log.1
LOG_CHECK_S = 2.0
QUIT_TIMEOUT_S = 5.0  # after SIGQUIT, then every process of the instance's cgroup is SIGKILLed
CGROUP_PARENT = "pgfleet"
SOCKET_ROOT = Path("/run/pgfleet")


@dataclass
class _Running:
    postmaster_pid: int
    waiter: asyncio.Task  # completes when the postmaster has exited
    stopping: bool = False
    spec: InstanceSpec | None = None


class SandboxDriver(SandboxBackups, Driver):
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
        return cgroups.Cgroup(self.cgroup_parent, spec.uuid)

    def _freezer(self, spec: InstanceSpec) -> freeze.Freezer:
        return freeze.Freezer(self.cgroup_parent, spec.uuid)

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
        self.storage.provision(spec.home, self.uid_of(spec))

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

    def auth_dir(self, spec: InstanceSpec) -> Path:
        """Root-owned pg_hba.conf / pg_ident.conf, outside the tenant-writable data directory."""
        return spec.home / "auth"

    def uid_of(self, spec: InstanceSpec) -> int:
        """The instance's uid (and gid): allocated host-wide (uids.py) the first time it is
        asked for, recorded in its home. An instance made before that record keeps the uid
        its files have (and has it registered)."""
        uid = self._uids.get(spec.uuid)
        if uid is not None:
            return uid
        record = spec.home / "uid"
        try:
            uid = int(record.read_text())
        except FileNotFoundError:
            uid = self._legacy_uid(spec)
            try:
                if uid is not None:
                    self.uids.claim(uid, spec.home)
                else:
                    # the home exists first: the registry takes an entry whose home is
                    # missing for a stale one
                    spec.home.mkdir(parents=True, exist_ok=True)
                    os.chmod(spec.home, 0o700)
                    uid = self.uids.allocate(spec.home)
            except RuntimeError as exc:
                raise DriverError(str(exc)) from None
            _write_root_file(record, f"{uid}\n")
        self._uids[spec.uuid] = uid
        return uid

    def _legacy_uid(self, spec: InstanceSpec) -> int | None:
        """The owner of an existing instance's files (its overlay's upper directory, or its
        data directory), from before uids were recorded."""
        for path in (spec.home / "upper", self.data_dir(spec)):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if st.st_uid != 0:
                return st.st_uid
        return None

    def _write_auth_files(self, spec: InstanceSpec) -> list[str]:
        """Who may log in over the instance's socket: host root only (the daemon: admin
        work as postgres, the proxy as the tenant's role), by peer credentials. The
        instance's own uid has no passwd entry, so peer authentication refuses it whatever
        role it asks for: code running as the tenant cannot log in as a superuser.
        Returns the postgres options that point at these files."""
        d = self.auth_dir(spec)
        d.mkdir(mode=0o755, exist_ok=True)
        files = {
            "pg_hba.conf": "# pgfleet: only host root, by peer credentials (see pg_ident.conf)\n"
                           "local all all peer map=pgfleet\n",
            "pg_ident.conf": "# MAPNAME SYSTEM-USERNAME PG-USERNAME\n"
                             f"pgfleet root postgres\npgfleet root {_hba_token(spec.role)}\n",
        }
        for name, text in files.items():
            path = d / name
            try:
                if path.read_text() == text:
                    continue
            except FileNotFoundError:
                pass
            tmp = d / f".{name}.tmp"
            tmp.write_text(text)
            os.chmod(tmp, 0o644)
            tmp.rename(path)
        return ["-c", f"hba_file={d / 'pg_hba.conf'}", "-c", f"ident_file={d / 'pg_ident.conf'}"]

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
            _write_root_file(marker, wanted)
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

    async def _launch(self, spec: InstanceSpec, extra_args: list[str] | None = None,
                      ready_timeout_s: float = READY_TIMEOUT_S) -> Backend:
        entry = self._running.get(spec.uuid)
        if entry is not None and entry.stopping:
            await asyncio.shield(entry.waiter)  # a stop in progress (a stray after a restart)
        elif entry is not None:
            return self.backend(spec)
        data = self.data_dir(spec)
        if self.storage is None:
            await self.prepare()
        assert self.storage is not None
        if spec.disk_mb:  # its own filesystems; mounted until the host reboots
            await disk.ensure_mounted_all(spec.home, data)
        else:
            self.storage.mount(spec.home)
        if not (data / "PG_VERSION").exists():
            self.storage.unmount(spec.home)
            raise DriverError(f"database {spec.name} has no data directory at {data}")
        uid = self.uid_of(spec)
        run = self.socket_dir(spec)
        run.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
        run.mkdir(mode=0o700, exist_ok=True)
        os.chown(run, uid, uid)
        pidfile = data / "postmaster.pid"
        if pidfile.exists():
            # Left by a crash, or by a postmaster still alive after a daemon crash: that
            # one must never get a twin (in its PID namespace it is PID 1, so Postgres' own
            # interlock cannot tell). Without a live postmaster the file is stale.
            live = find_postmaster(data)
            if live is not None:
                await self._adopt_or_stop(spec, live, keep=False)
            pidfile.unlink(missing_ok=True)
        archive.prepare_spool(data, uid)
        shared_buffers = max(16, spec.memory_mb // 8)
        argv = self._sandboxed(spec, [
            # canonical paths: the jail binds them at exactly these paths in its private root
            str(self.pg.postgres), "-D", os.path.realpath(data), "-k", os.path.realpath(run), "-p", str(PORT),
            "-c", f"shared_buffers={shared_buffers}MB",
            "-c", f"cluster_name={spec.name}",
            *self._write_auth_files(spec),
            *archive.postgres_args(), *(extra_args or []),
        ])
        # 0600: only root reads a tenant's log (the tenant writes it through this descriptor)
        logf = os.fdopen(os.open(self.log_path(spec), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600), "ab")
        os.fchmod(logf.fileno(), 0o600)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
            )
        finally:
            logf.close()
        try:
            pm_pid = await self._wait_ready(spec, proc, ready_timeout_s)
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            self._cgroup(spec).remove()
            self.storage.unmount(spec.home)
            self._freezer(spec).remove()
            raise
        self._watch(spec, pm_pid, proc.wait())
        return self.backend(spec)

    def _sandboxed(self, spec: InstanceSpec, argv: list[str], wait_detach: bool = False) -> list[str]:
        """`argv` run the way every process of the instance runs: in its cgroups and freezer
        (made here if missing), as its uid, in fresh namespaces, in a private root holding only
        its own directories (jail.c). Spawn it with no preexec_fn (see jail_argv)."""
        assert self.jail is not None, "prepare() first"
        cg = self._cgroup(spec)
        cg.create(self._limits(spec))
        freezer = self._freezer(spec)  # code run by a tenant's postgres is frozen with it
        freezer.create()
        return jail_argv(self.jail, self.uid_of(spec), _tmpfs_mb(spec), self.data_dir(spec),
                         self.socket_dir(spec), self.auth_dir(spec), argv,
                         cgroup_procs=cg.procs_files() + freezer.procs_files(), wait_detach=wait_detach,
                         wal=disk.wal_dir(spec.home) if spec.disk_mb else None)

    def exec_as_tenant(self, spec: InstanceSpec, argv: list[str], timeout: float = 60.0,
                       input: str | None = None) -> subprocess.CompletedProcess:
        """Run `argv` exactly as the instance's postgres runs (same uid, kind of namespaces,
        cgroups), as code execution inside the database would: the hostile-tenant tests'
        shell. Blocks; returns the finished process with text stdout/stderr."""
        return subprocess.run(
            self._sandboxed(spec, argv, wait_detach=True), input=input, capture_output=True, text=True,
            timeout=timeout, start_new_session=True,
        )

    async def _wait_ready(self, spec: InstanceSpec, proc: asyncio.subprocess.Process,
                          timeout_s: float = READY_TIMEOUT_S) -> int:
        """Wait until the postmaster reports 'ready' in postmaster.pid; returns its host pid."""
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.returncode is not None:
                raise DriverError(f"postgres for {spec.name} exited during start: {self._log_tail(spec)}")
            if _is_ready(self.data_dir(spec)):
                pm = _child_of(proc.pid)
                if pm is not None:
                    return pm
            if time.monotonic() > deadline:
                raise DriverError(f"postgres for {spec.name} not ready after {timeout_s:.0f}s: {self._log_tail(spec)}")
            # A wake is on the client's clock: poll finely (reading a 100-byte file is
            # cheap next to a 1 ms granularity added to every wake).
            await asyncio.sleep(0.001)

    def _log_tail(self, spec: InstanceSpec) -> str:
        data = read_tail(self.log_path(spec), 4096)  # the tenant writes it: bounded
        if data is None:
            return "(no log)"
        return " | ".join(data.decode(errors="replace").strip().splitlines()[-3:])

    def _watch(self, spec: InstanceSpec, pm_pid: int, exited) -> None:
        async def waiter() -> None:
            await exited
            entry = self._running.pop(spec.uuid, None)
            self._cgroup(spec).remove()
            self._freezer(spec).remove()
            if self.storage is not None and not spec.disk_mb:
                self.storage.unmount(spec.home)
            if entry is not None and not entry.stopping:
                log.warning("postgres of %s exited on its own: %s", spec.name, self._log_tail(spec))
                self.on_exit(spec, "exited")

        self._running[spec.uuid] = _Running(pm_pid, asyncio.create_task(waiter()), spec=spec)
        if self._log_guard is None:
            self._log_guard = asyncio.create_task(self._guard_logs())

    async def _guard_logs(self) -> None:
        """Every LOG_CHECK_S while instances run: a postgres.log over LOG_MAX_BYTES / 2 (the
        tenant writes it, e.g. RAISE WARNING in a loop) keeps its last half in postgres.log.1
        and starts again, so one instance's logs never take more than LOG_MAX_BYTES."""
        try:
            while self._running:
                await asyncio.sleep(LOG_CHECK_S)
                for entry in list(self._running.values()):
                    rotate_log(self.log_path(entry.spec), LOG_MAX_BYTES // 2)
        finally:
            self._log_guard = None

    async def suspend(self, spec: InstanceSpec) -> None:
        # Fast shutdown: ends sessions, writes a shutdown checkpoint: the data is durable and
        # the next start needs no recovery.
        await self._shutdown(spec, signal.SIGINT)

    async def stop(self, spec: InstanceSpec) -> None:
        await self._shutdown(spec, signal.SIGINT)

    async def _shutdown(self, spec: InstanceSpec, sig: signal.Signals,
                        timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Send `sig`; if the postmaster is still there after `timeout`, SIGQUIT; after
        QUIT_TIMEOUT_S more, SIGKILL every process of its cgroup. Never waits for ever."""
        self._unfreeze(spec)  # a frozen process would not act on the signal
        entry = self._running.get(spec.uuid)
        if entry is None:
            stale = find_postmaster(self.data_dir(spec))
            if stale is not None:
                await self._adopt_or_stop(spec, stale, keep=False)
            return
        entry.stopping = True
        _kill(entry.postmaster_pid, sig)
        if await _exits_within(entry, timeout):
            return
        if sig != signal.SIGQUIT:
            log.error("postgres of %s ignored shutdown for %ss; sending SIGQUIT", spec.name, timeout)
            _kill(entry.postmaster_pid, signal.SIGQUIT)
            if await _exits_within(entry, QUIT_TIMEOUT_S):
                return
        # e.g. blocked for ever on a FIFO the tenant put in place of its own lock file
        log.error("postgres of %s ignored SIGQUIT for %ss; killing its cgroup", spec.name, QUIT_TIMEOUT_S)
        self._cgroup(spec).kill()
        await entry.waiter

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

    async def remove_orphan(self, home: Path) -> None:
        if self.storage is None or not self.storage.is_overlay(home):
            return  # not a provision() of ours
        if find_postmaster(home / "data") is not None:
            log.error("%s has no database recorded but a live postgres: left alone", home)
            return
        log.warning("removing %s: a create cut short (no database was recorded for it)", home)
        self.storage.destroy(home)

    async def recover_scan(self, specs: list[InstanceSpec]) -> set[str] | None:
        self._scanned = await asyncio.to_thread(find_postmasters)
        real = {p: os.path.realpath(p) for p in {s.home.parent for s in specs}}  # one per instances dir
        by_dir = {os.path.join(real[s.home.parent], s.home.name, self.data_dir(s).name): s for s in specs}
        alive = {by_dir[d].uuid for d in self._scanned if d in by_dir}
        # data directories a crash left mounted with no Postgres on them: unmount (one
        # pass over the mount table, not one look per database)
        for parent in real:
            for data in mounted_data_dirs(parent):
                spec = by_dir.get(str(data))
                if spec is not None and spec.uuid not in alive and self.storage is not None:
                    self.storage.unmount(spec.home)
        return alive

    def recover_done(self) -> None:
        self._scanned = None

    def _postmaster_of(self, spec: InstanceSpec) -> int | None:
        if self._scanned is not None:
            return self._scanned.get(os.path.realpath(self.data_dir(spec)))
        return find_postmaster(self.data_dir(spec))

    async def recover(self, spec: InstanceSpec) -> Backend | None:
        pm = self._postmaster_of(spec)
        if pm is None:
            self._cgroup(spec).remove()
            self._freezer(spec).remove()
            return None
        if _is_ready(self.data_dir(spec)):
            return await self._adopt_or_stop(spec, pm, keep=True)
        # Alive but not ready (or its lock file is not one: the tenant controls it): stop it
        # in the background, so that one tenant never holds up the daemon's start. A start
        # of this instance in the meantime waits for that stop (same waiter).
        if spec.uuid not in self._running:
            self._watch(spec, pm, _wait_pid_exit(pm))
        # immediate shutdown: it was not serving, and WAL recovery makes the next start whole
        task = asyncio.create_task(self._shutdown(spec, signal.SIGQUIT, QUIT_TIMEOUT_S))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)
        return None

    async def _adopt_or_stop(self, spec: InstanceSpec, pm_pid: int, keep: bool) -> Backend | None:
        """A postmaster we did not start in this daemon's life: watch it, or stop it."""
        if spec.uuid not in self._running:
            self._watch(spec, pm_pid, _wait_pid_exit(pm_pid))
        if keep and _is_ready(self.data_dir(spec)):
            return self.backend(spec)
        await self._shutdown(spec, signal.SIGINT)
        return None

    async def disk_bytes(self, spec: InstanceSpec) -> int | None:
        if self.storage is None:
            return None
        return await asyncio.to_thread(self.storage.disk_bytes, spec.home)

    async def usage(self, spec: InstanceSpec) -> dict[str, int]:
        if spec.uuid not in self._running:
            return {"rss_bytes": 0}
        current = self._cgroup(spec).memory_current()
        return {"rss_bytes": current} if current is not None else {}

    # --- warm standby: frozen processes, memory reclaimed (freeze.py) --------------------
    def warm_mode(self) -> str | None:
        if not self.keeps_sessions_across_suspend:
            return None
        return "reclaim" if swap.total_bytes() > 0 else "freeze"

    async def freeze(self, spec: InstanceSpec) -> int:
        if spec.uuid not in self._running:
            raise DriverError(f"database {spec.name} is not running")
        try:
            await self._freezer(spec).freeze()
        except freeze.FreezeFailed as exc:
            raise DriverError(f"database {spec.name} could not be frozen: {exc}") from exc
        memory = self._memory_dir(spec)
        if memory is None:
            return 0
        if self.warm_mode() == "reclaim":
            return await asyncio.to_thread(freeze.reclaim, memory, self._cgroup(spec).v2)
        return freeze.charged_bytes(memory, self._cgroup(spec).v2)[0]

    async def thaw(self, spec: InstanceSpec) -> Backend:
        if spec.uuid not in self._running:
            raise DriverError(f"the processes of frozen database {spec.name} are gone")
        self._unfreeze(spec)
        return self.backend(spec)

    def is_frozen(self, spec: InstanceSpec) -> bool:
        return self._freezer(spec).is_frozen()

    def memory_charged(self, spec: InstanceSpec) -> tuple[int, int]:
        memory = self._memory_dir(spec)
        if memory is None or spec.uuid not in self._running:
            return 0, 0
        return freeze.charged_bytes(memory, self._cgroup(spec).v2)

    def _unfreeze(self, spec: InstanceSpec) -> None:
        """Limit first, then thaw: the thawed processes fault their pages back in at once."""
        freezer = self._freezer(spec)
        if not freezer.is_frozen():
            return
        memory = self._memory_dir(spec)
        if memory is not None:
            freeze.restore_limit(memory, self._cgroup(spec).v2, self._limits(spec).memory_bytes)
        freezer.thaw()

    def _memory_dir(self, spec: InstanceSpec) -> Path | None:
        dirs = self._cgroup(spec).dirs
        return dirs.get("unified") or dirs.get("memory")

    async def close(self) -> None:
        """Remove this home's empty per-host directories (socket root, cgroup parents) so
        that homes that come and go leave nothing behind."""
        sockets = SOCKET_ROOT / self.home_tag
        slots = [d for d in sockets.iterdir() if d.is_dir()] if sockets.is_dir() else []
        freezer_parent = freeze.Freezer(CGROUP_PARENT, self.home_tag).dir
        for d in [*slots, sockets, *cgroups.Cgroup(CGROUP_PARENT, self.home_tag).dirs.values(), freezer_parent]:
            try:
                d.rmdir()
            except OSError:
                pass  # still in use (instances left running on purpose), or already gone


def _hba_token(role: str) -> str:
    """A role name as one pg_ident.conf token (names are DNS labels; refuse anything else)."""
    if not role or any(not (c.isalnum() or c in "-_") for c in role):
        raise DriverError(f"role name {role!r} cannot be written into pg_ident.conf")
    return role


def _write_root_file(path: Path, text: str) -> None:
    """A small root-owned 0600 file in an instance's (root-owned) home, replaced atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _home_tag(state_dir: Path) -> str:
    import hashlib

    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]


def _tmpfs_mb(spec: InstanceSpec) -> int:
    """Size of each of the instance's private /tmp and /dev/shm (both charged to its memory
    cgroup, so together they can never hold more than memory_mb anyway)."""
    return max(16, spec.memory_mb // 2)


def _child_of(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def _kill(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _is_ready(data: Path) -> bool:
    """postmaster.pid says "ready". The tenant owns that file: read without trusting it
    (a FIFO, a symlink or a huge file is simply "not ready")."""
    head = read_head(data / "postmaster.pid")
    lines = head.decode(errors="replace").splitlines() if head is not None else []
    return len(lines) >= 8 and lines[7].strip() == "ready"


async def _exits_within(entry: _Running, timeout: float) -> bool:
    try:
        await asyncio.wait_for(asyncio.shield(entry.waiter), timeout)
    except asyncio.TimeoutError:
        return False
    return True


async def _wait_pid_exit(pid: int) -> None:
    """Wait for a process that is not our child to exit (pidfd: no polling, no pid reuse race)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
