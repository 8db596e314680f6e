"""Scale to zero: client sessions counted, and the countdown that suspends an idle database.

A database with policy `on` scales to zero `cooldown_ms` after its last client session
ends; with `idle`, after its last query or transaction ends (sessions stay open across the
suspend); with `off`, never. Where the host has a warm tier, idle means warm standby.
The proxy calls in here once per connection and once per transaction: that path reads
the settings cached in the Runtime, not SQLite.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator

from .runtime import Runtime
from .states import State

if TYPE_CHECKING:
    from .manager import Fleet

log = logging.getLogger(__name__)


class ScaleToZero:
    def __init__(self, fleet: "Fleet") -> None:
        self.fleet = fleet

    @asynccontextmanager
    async def lease(self, uuid: str, *, fresh: bool = True) -> AsyncIterator[Runtime]:
        """Count one client session; while any exists the instance is not scaled to zero.
        `fresh=False` (a session per HTTP request) trusts the settings cached in the runtime
        when re-arming the countdown, as session_busy does, instead of reading SQLite."""
        runtimes = self.fleet.rt
        rt = runtimes.of(uuid)
        rt.clients += 1
        rt.total_connections += 1
        rt.last_active = time.monotonic()
        rt.cancel_idle_timer()
        try:
            yield rt
        finally:
            rt.clients -= 1
            rt.last_active = time.monotonic()
            if rt.clients == 0:
                rt.drained.set()
                self.arm_idle_timer(uuid, fresh=fresh)
                runtimes.forget_if_unused(uuid, rt)

    def session_busy(self, uuid: str, busy: bool) -> None:
        """A session started (True) or finished (False) a query or transaction. With the
        `idle` policy only busy sessions keep a database awake."""
        rt = self.fleet.rt.get(uuid)
        if rt is None:
            return
        rt.busy += 1 if busy else -1
        rt.last_active = time.monotonic()
        if busy:
            if rt.idle_timer is not None:
                rt.cancel_idle_timer()
        elif rt.busy <= 0:
            rt.busy = 0
            if rt.policy == "idle" or rt.clients == 0:
                self.arm_idle_timer(uuid, fresh=False)

    def in_use(self, uuid: str) -> bool:
        """A session keeps this database from scaling to zero (see Runtime.in_use)."""
        rt = self.fleet.rt.get(uuid)
        if rt is None:
            return False
        if rt.policy is None:
            row = self.fleet.store.get(uuid)
            rt.policy = row.stz_policy if row else None
        return rt.in_use()

    def arm_idle_timer(self, uuid: str, fresh: bool = True) -> None:
        """(Re)start the countdown to scale-to-zero. `fresh=False` trusts the settings cached
        in the runtime: the proxy calls this once per transaction, too often for SQLite."""
        rt = self.fleet.rt.get(uuid)
        if rt is None or self.fleet.closing:
            return
        if fresh or rt.policy is None:
            row = self.fleet.store.get(uuid)
            if row is None:
                return
            rt.policy, rt.cooldown_ms, rt.running = row.stz_policy, row.cooldown_ms, row.state == State.RUNNING
        rt.cancel_idle_timer()
        if rt.policy == "off" or rt.in_use() or not rt.running:
            return
        due = max(0.0, rt.cooldown_ms / 1000 - (time.monotonic() - rt.last_active))
        rt.idle_timer = asyncio.get_running_loop().call_later(due, self._idle_due, uuid)

    def _idle_due(self, uuid: str) -> None:
        rt = self.fleet.rt.get(uuid)
        if rt is not None:
            rt.idle_timer = None
        self.fleet.spawn(self._scale_to_zero(uuid))

    async def _scale_to_zero(self, uuid: str) -> None:
        fleet = self.fleet
        try:
            if fleet.store.get(uuid) is None:
                return
            if fleet.warm.mode is not None:
                await fleet.warm.enter(uuid, "idle", only_if_idle=True)
            else:
                await fleet.suspend(uuid, reason="idle", drain_timeout_s=0, only_if_idle=True)
        except Exception:
            log.exception("scale to zero of %s failed", uuid)
