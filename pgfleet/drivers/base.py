"""The isolation driver interface: what the fleet asks of any way of running one Postgres.

The fleet owns the state machine and persistence; a driver only turns one instance's
desired condition into processes (or VMs) and reports how to reach its Postgres.
Drivers never touch the store.
"""

from __future__ import annotations

import abc
import asyncio
import ctypes
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar


class DriverError(RuntimeError):
    """A driver could not do what it was asked; the message is shown to users."""


class DriverUnavailable(DriverError):
    """The driver cannot run on this host (missing binary, no KVM, not built yet)."""


@dataclass(frozen=True)
class Backend:
    """How the host reaches one running instance's Postgres.

    Exactly one of `socket_dir` (a unix socket directory, port names the socket file)
    or `host` (TCP) is set. A TCP backend may live inside a network namespace
    (`netns`, a name under /run/netns): the host reaches it by opening the socket there.
    `admin_user` may connect without a password from the host.
    """

    port: int = 5432
    socket_dir: str | None = None
    host: str | None = None
    netns: str | None = None
    admin_user: str = "postgres"
    database: str = "postgres"

    def describe(self) -> str:
        if self.socket_dir is not None:
            return f"unix:{self.socket_dir}"
        if self.netns is not None:
            return f"netns:{self.netns}/{self.host}:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def socket_path(self) -> str | None:
        if self.socket_dir is None:
            return None
        return f"{self.socket_dir}/.s.PGSQL.{self.port}"

    async def open_connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.socket_path is not None:
            return await asyncio.open_unix_connection(self.socket_path)
        if self.netns is not None:
            sock = await asyncio.get_running_loop().run_in_executor(
                None, netns_socket, self.netns
            )
            await asyncio.get_running_loop().sock_connect(sock, (self.host, self.port))
            return await asyncio.open_connection(sock=sock)
        return await asyncio.open_connection(self.host, self.port)


def netns_socket(netns: str) -> socket.socket:
    """A non-blocking TCP socket created inside network namespace `netns`.

    A socket keeps the namespace it was created in, so only its creation needs to
    happen there; this runs on a worker thread so the daemon's own thread never
    leaves the host namespace.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:  # never leave a pool thread elsewhere
                os._exit(70)
        return sock
    finally:
        os.close(own)
        os.close(target)


CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class InstanceSpec:
    """What a driver needs to know about one instance; built by the fleet from the store."""

    uuid: str
    name: str
    role: str
    memory_mb: int
    slot: int  # small, unique, stable integer per instance (uids, addresses)
    home: Path  # this instance's own directory, created by the fleet
    vcpus: int = 1
    disk_mb: int = 0  # 0: no disk limit of its own
    cpu_pct: int = 0  # CPU cap in percent of one CPU (cgroup cpu quota); 0: none


ExitCallback = Callable[[InstanceSpec, str], None]


@dataclass(frozen=True)
class RecoveryTarget:
    """Where a point-in-time recovery stops: 'immediate' (the first consistent point), 'time'
    (a unix time: every transaction committed at or before it), 'lsn', or 'end' (all WAL)."""

    kind: str
    value: float | int | None = None


class Driver(abc.ABC):
    """One way of isolating a database. Every method is idempotent where it can be.

    Lifecycle as the fleet drives it:
      create()  : make the instance's data from a template, start it, personalise it
                  (its role exists); returns a running Backend.
      start()   : standby/stopped -> running (resume); returns the Backend.
      suspend() : running -> (cold) standby: no process and no memory left, data kept.
      freeze()/thaw(): running <-> warm standby, where the driver has it (warm_mode()).
      stop()    : running -> stopped (a full shutdown).
      destroy() : remove everything the instance owns. Stops it first if needed.
      recover() : after a daemon restart: adopt a live instance (returns its Backend)
                  or clean up stale processes so a later start() is safe (returns None).
    A driver calls `on_exit(spec, reason)` when an instance it started dies on its own.
    """

    name: ClassVar[str]
    #: open server sessions survive a suspend (a VM's TCP sessions do; a frozen process's do,
    #: a stopped one's do not)
    keeps_sessions_across_suspend: ClassVar[bool] = False
    #: provision() makes a database that is complete but not started (created in standby:
    #: its first connection starts it), so creating needs no Postgres start
    can_provision: ClassVar[bool] = False

    def __init__(self, state_dir: Path, on_exit: ExitCallback | None = None) -> None:
        self.state_dir = state_dir
        self.on_exit: ExitCallback = on_exit or (lambda spec, reason: None)

    @abc.abstractmethod
    async def prepare(self) -> None:
        """Make the host ready (templates, images); slow work happens here, once."""

    @abc.abstractmethod
    async def create(self, spec: InstanceSpec) -> Backend: ...

    async def provision(self, spec: InstanceSpec) -> None:
        """Only where `can_provision`: make the instance's data, leave it stopped; start()
        finishes what create() would have done (its role)."""
        raise NotImplementedError

    @abc.abstractmethod
    async def start(self, spec: InstanceSpec) -> Backend: ...

    @abc.abstractmethod
    async def suspend(self, spec: InstanceSpec) -> None: ...

    @abc.abstractmethod
    async def stop(self, spec: InstanceSpec) -> None: ...

    @abc.abstractmethod
    async def destroy(self, spec: InstanceSpec) -> None: ...

    @abc.abstractmethod
    async def recover(self, spec: InstanceSpec) -> Backend | None: ...

    async def remove_orphan(self, home: Path) -> None:
        """Recovery found `home` (an instance directory) with no database recorded for it: a
        provision() cut short by a crash. Remove it if it is one; leave anything else."""

    async def recover_scan(self, specs: list[InstanceSpec]) -> set[str] | None:
        """Before a recovery: the uuids among `specs` that have processes on this host, found
        in one pass, or None if the driver cannot tell (then every instance is recovered one
        by one). The driver may keep what it found for its recover() calls until recover_done()."""
        return None

    def recover_done(self) -> None:
        """The recovery is over: forget what recover_scan() found."""
    # --- warm standby (optional): processes kept but frozen, memory reclaimed ----------------
    def warm_mode(self) -> str | None:
        """What the warm tier does on this host: "reclaim" (frozen, memory pushed to swap),
        "freeze" (frozen, memory stays charged: no swap), or None (cold standby only)."""
        return None

    async def freeze(self, spec: InstanceSpec) -> int:
        """running -> warm: no CPU, memory reclaimed where it can be; sessions kept.
        Returns the bytes still charged. DriverError if it cannot (the fleet goes cold)."""
        raise DriverError(f"the {self.name} driver has no warm standby")

    async def thaw(self, spec: InstanceSpec) -> Backend:
        """warm -> running: limits restored, processes running again. DriverError if the
        frozen processes are gone."""
        raise DriverError(f"the {self.name} driver has no warm standby")

    async def reclaim_again(self, spec: InstanceSpec) -> int:
        """warm: push out what the freeze's reclaim could not yet (pages touched just before
        it resist it). The fleet calls it once the freeze has settled, under the instance's
        lock. Returns the bytes still charged."""
        return self.memory_charged(spec)[0]

    def is_frozen(self, spec: InstanceSpec) -> bool:
        return False

    def memory_charged(self, spec: InstanceSpec) -> tuple[int, int]:
        """(memory charged, swap used) by the instance now, running or warm."""
        return 0, 0

    #: the driver enforces InstanceSpec.disk_mb (writes over it fail with 53100, disk_full)
    enforces_disk_mb: ClassVar[bool] = False

    async def resize_disk(self, spec: InstanceSpec) -> None:
        """Apply a changed spec.disk_mb to an existing instance (running or not)."""
        raise DriverError(f"the {self.name} driver does not enforce disk_mb")

    def log_path(self, spec: InstanceSpec) -> Path | None:
        """The instance's console / server log file, if the driver keeps one."""
        return None

    async def disk_bytes(self, spec: InstanceSpec) -> int | None:
        """Disk space the instance itself owns (not what it shares with others), if known."""
        return None

    async def usage(self, spec: InstanceSpec) -> dict[str, int]:
        """Resource use of a running instance: rss_bytes, cpu_time_ms where known."""
        return {}

    async def close(self) -> None:
        """Release host resources the driver holds (not the instances)."""

    # --- continuous archiving and branches (pgfleet.fleet.branches drives these) ------------
    #: the driver archives WAL, takes base backups and makes branches
    supports_branches: ClassVar[bool] = False

    def _no_branches(self) -> DriverError:
        return DriverError(f"the {self.name} driver does not support backups and branches yet")

    async def archive(self, spec: InstanceSpec, repo: Path, *, stopped: bool) -> None:
        """Move what the instance has archived into `repo`; once stopped, the rest of its WAL too."""
        raise self._no_branches()

    async def flush_archive(self, spec: InstanceSpec, repo: Path) -> None:
        """A running instance: everything committed so far reaches `repo`."""
        raise self._no_branches()

    async def base_backup(self, spec: InstanceSpec, repo: Path, dest: Path) -> dict:
        """A consistent copy of the instance's data into the new directory `dest`; returns
        {start_segment, timeline, consistent_at}. A stopped instance must stay stopped meanwhile."""
        raise self._no_branches()

    async def branch(self, parent: InstanceSpec, parent_repo: Path, child: InstanceSpec) -> Backend:
        """Make `child` a copy of `parent` as of now and start it."""
        raise self._no_branches()

    async def restore(self, child: InstanceSpec, backup: Path, meta: dict, repo: Path,
                      target: RecoveryTarget) -> Backend:
        """Make `child` from base backup `backup` plus `repo`'s WAL up to `target`, and start it."""
        raise self._no_branches()

    async def rename_role(self, spec: InstanceSpec, backend: Backend, old: str, new: str,
                          database: str | None = None) -> Backend:
        """The tenant's role in a copied database takes the copy's own name, and the database
        inside takes `database` (default: spec.name); returns the backend that connects to it."""
        raise self._no_branches()


async def admin_connect(backend: Backend, user: str | None = None):
    """An AdminConnection to `backend` as its password-less admin role (or `user`)."""
    from pgfleet.pgwire.client import AdminConnection

    reader, writer = await backend.open_connection()
    try:
        return await AdminConnection.open(reader, writer, user or backend.admin_user, backend.database)
    except BaseException:
        writer.close()
        raise
