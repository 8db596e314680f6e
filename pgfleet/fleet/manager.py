"""The fleet: the databases of one host, and the one object the layers above call.

`Fleet` is a facade. Each concern is a part of its own, and each public method here IS the
method of the part that owns it (bound once in __init__: one signature in one place, and no
extra call on the proxy's per-message path):

- transitions.py  the state machine at work: every transition checked and committed before
                  anyone acts on it (Transitions.change_state); waiting for states
- runtime.py      what is known in memory only: each database's lock, backend and sessions
- queries.py      the read side for the API, the proxy, the edge and the CLI
- provisioning.py create, delete, settings, credentials
- power.py        wake/start, suspend (warm or cold), stop; a database that dies on its own
- scaling.py      scale to zero: client sessions and the idle countdown
- standby.py      the warm tier (frozen, not stopped)
- recovery.py     the store and the host brought into agreement at daemon start
- quotas.py       admission control on every path that makes a database live

The parts reach each other through this object; the layers above use only what is listed
under "the fleet's interface" below (and the attributes documented in __init__).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Coroutine

from pgfleet.drivers.base import Driver, InstanceSpec
from pgfleet.store import InstanceRow, Store

from .events import EventLog
from .power import Power
from .provisioning import Provisioning
from .queries import Queries
from .quotas import Quotas
from .recovery import Recovery
from .runtime import Runtimes
from .scaling import ScaleToZero
from .standby import WarmTier
from .states import State
from .telemetry import Telemetry
from .transitions import Transitions

if TYPE_CHECKING:
    from .branches import Backups
    from .memory import MemoryManager

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
        #: where each database's directory is: <home>/instances, resolved once because on a
        #: copy-on-write store (drivers/cowstore) it is a symlink to the store, and a
        #: database's paths must be canonical (the jail binds them at exactly these paths)
        self.instances_root = (home / "instances").resolve()
        #: admission control, checked on every path that makes a database live (create and
        #: every start: wake, resume, the UKC routes, Kubernetes); None: the defaults
        self.quotas = quotas if quotas is not None else Quotas()
        #: admission of starts (wakes and creates): bounded, first come first served, so a
        #: storm of wakes queues instead of thrashing and every database gets its turn
        self.start_slots = asyncio.Semaphore(start_concurrency or default_start_concurrency())
        #: what operators see: structured events (log, ring, followers) and lifecycle numbers
        self.events = EventLog()
        self.telemetry = Telemetry()
        #: the host memory manager (pgfleet.fleet.memory), when the daemon runs one
        self.memory: MemoryManager | None = None
        #: continuous archiving (pgfleet.fleet.branches.Backups attaches itself), or None
        self.backups: Backups | None = None
        #: called with a database's uuid once it is deleted (proxies drop their pools)
        self.on_delete: list[Callable[[str], None]] = []
        self.closing = False  # the daemon is stopping: no timer is armed, nothing restarts
        self._tasks: set[asyncio.Task] = set()

        # the parts
        self.rt = Runtimes()
        self.queries = Queries(self)
        self.transitions = Transitions(store, self.events, self.queries.get)
        self.scaling = ScaleToZero(self)
        self.power = Power(self)
        self.warm = WarmTier(self)
        self.provisioning = Provisioning(self)
        self.recovery = Recovery(self)

        # --- the fleet's interface ---------------------------------------------------------
        # reads (the proxy's per-message ones first)
        self.backend_of = self.rt.backend_of
        self.is_known = self.rt.is_known
        self.is_up = self.rt.is_up
        self.sessions = self.rt.sessions
        self.find = self.queries.find
        self.find_uuid = self.queries.find_uuid
        self.get = self.queries.get
        self.list = self.queries.all
        self.page = self.queries.page
        self.count_by_state = self.queries.count_by_state
        self.history = self.queries.history
        self.quota_usage = self.queries.quota_usage
        self.usage = self.queries.usage
        self.disk_bytes = self.queries.disk_bytes
        self.memory_charged = self.queries.memory_charged
        self.log_path = self.queries.log_path
        self.wait_for = self.transitions.wait_for
        self.standby_status = self.warm.status
        #: called with a database's uuid as it is frozen (the pooler closes its idle server connections)
        self.on_freeze = self.warm.on_freeze
        self.before_freeze = self.warm.before_freeze
        # client sessions
        self.lease = self.scaling.lease
        self.session_busy = self.scaling.session_busy
        self.in_use = self.scaling.in_use
        # lifecycle
        self.create = self.provisioning.create
        self.delete = self.provisioning.delete
        self.update = self.provisioning.update
        self.rotate_password = self.provisioning.rotate_password
        self.set_tags = self.provisioning.set_tags
        self.ensure_running = self.power.ensure_running
        self.resume = self.power.resume
        self.suspend = self.power.suspend
        self.stop = self.power.stop
        self.recover = self.recovery.recover

    @property
    def keeps_sessions_across_suspend(self) -> bool:
        """Whether the driver keeps sessions open across a suspend (the `idle` policy needs it)."""
        return self.driver.keeps_sessions_across_suspend

    @property
    def driver_name(self) -> str:
        return self.driver.name

    def data_path(self, row: InstanceRow) -> Path:
        """The directory holding everything of one database (its volume)."""
        return self.instances_root / row.uuid

    def spec(self, row: InstanceRow) -> InstanceSpec:
        """What the driver is told of a database."""
        return InstanceSpec(
            uuid=row.uuid, name=row.name, role=row.role, memory_mb=row.memory_mb,
            slot=row.slot, home=self.data_path(row), vcpus=row.vcpus, disk_mb=row.disk_mb,
            cpu_pct=row.cpu_pct,
        )

    def spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        """Run `coro` in the background until it ends or the daemon stops."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
