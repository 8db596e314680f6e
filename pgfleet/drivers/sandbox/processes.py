"""The sandbox driver's postmasters: launching one jailed (jail.c) in the instance's cgroups,
waiting until it is ready, watching it exit, stopping it in bounded time, keeping its log
bounded. A mixin of SandboxDriver: it uses the driver's paths, storage and cgroups and the
tenant's identity (identity.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..base import Backend, DriverError, InstanceSpec
from ..spawn import Spawned, spawn, wait_pid_exit
from ..untrusted import read_head, read_tail, rotate_log
from ..jail import jail_argv
from ..zygote import ZygoteProcess
from . import archive, disk
from .dirwatch import DirWatch
from .procscan import find_postmaster

log = logging.getLogger(__name__)

PORT = 5432  # names the socket file only: the network namespace has no interfaces
READY_TIMEOUT_S = 60.0
READY_RECHECK_S = 0.01  # between inotify events, for an exit during start
SHUTDOWN_TIMEOUT_S = 30.0
LOG_MAX_BYTES = 32 << 20  # per instance: postgres.log and postgres.log.1
LOG_CHECK_S = 2.0
QUIT_TIMEOUT_S = 5.0  # after SIGQUIT, then every process of the instance's cgroup is SIGKILLed


@dataclass
class _Running:
    postmaster_pid: int
    waiter: asyncio.Task  # completes when the postmaster has exited
    stopping: bool = False
    spec: InstanceSpec | None = None


class SandboxProcesses:
    """Methods of SandboxDriver; see Driver for what the public ones promise."""

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
            # no logical replication launcher: with wal_level=replica (and no superuser
            # tenant to subscribe) it can never do anything, and it would be one more
            # process forked on every wake, competing with the first session for the CPU
            "-c", "max_logical_replication_workers=0",
            *self._write_auth_files(spec),
            *archive.postgres_args(), *(extra_args or []),
        ])
        # 0600: only root reads a tenant's log (the tenant writes it through this descriptor)
        logf = os.fdopen(os.open(self.log_path(spec), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600), "ab")
        os.fchmod(logf.fileno(), 0o600)
        with DirWatch(data) as changes:  # watching before the spawn: no change is missed
            try:
                proc = self._spawn_jailed(argv, logf.fileno())
            finally:
                logf.close()
            try:
                pm_pid = await self._wait_ready(spec, proc, changes, ready_timeout_s)
            except BaseException:
                await self._kill_start(spec, proc)
                self._cgroup(spec).remove()
                self.storage.unmount(spec.home)
                self._freezer(spec).remove()
                raise
        self._watch(spec, pm_pid, proc.wait())
        return self.backend(spec)

    def _spawn_jailed(self, argv: list[str], log_fd: int) -> Spawned | ZygoteProcess:
        """Start a jailed postgres (`argv`: _sandboxed's): forked from the zygote, which has
        postgres loaded already, or else exec'd (vfork, whatever the event loop)."""
        if self.zygote is not None:
            forked = self.zygote.spawn(argv[1:], log_fd)
            if forked is not None:
                return forked
        return spawn(argv, stdout=log_fd, stderr=log_fd)

    async def _kill_start(self, spec: InstanceSpec, proc: Spawned | ZygoteProcess) -> None:
        """A start given up (failed, timed out, cancelled): every process it made is gone when
        this returns, not only the one spawned (unshare), so no postmaster is left behind on
        the data directory (a twin for the next start) or in the cgroup."""
        postmaster = _child_of(proc.pid)  # PID 1 of the instance's namespace, if it got that far
        if postmaster is not None:
            # PID 1 first: the kernel kills the rest of its namespace, and unshare (still
            # alive) reaps it and exits, so nothing is left to the host's init as a zombie
            _kill(postmaster, signal.SIGKILL)
            await wait_pid_exit(postmaster)
        self._cgroup(spec).kill()  # anything else (a start cut short before the fork)
        if proc.returncode is None:
            proc.kill()
        await proc.wait()

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

    async def _wait_ready(self, spec: InstanceSpec, proc: Spawned | ZygoteProcess, changes: DirWatch,
                          timeout_s: float = READY_TIMEOUT_S) -> int:
        """Wait until the postmaster reports 'ready' in postmaster.pid; returns its host pid.
        Looks again whenever the data directory changes (inotify: a wake is on the client's
        clock), and at least every READY_RECHECK_S (an exit during start changes nothing)."""
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
            await changes.changed(READY_RECHECK_S)

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

    async def _adopt_or_stop(self, spec: InstanceSpec, pm_pid: int, keep: bool) -> Backend | None:
        """A postmaster we did not start in this daemon's life: watch it, or stop it."""
        if spec.uuid not in self._running:
            self._watch(spec, pm_pid, wait_pid_exit(pm_pid))
        if keep and _is_ready(self.data_dir(spec)):
            return self.backend(spec)
        await self._shutdown(spec, signal.SIGINT)
        return None



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
