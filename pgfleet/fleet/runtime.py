"""What the fleet knows about a database in memory only: its lock, backend and sessions.

Nothing here survives a restart (the store holds what must), and an object exists only
while something uses the database, so a fleet of 10,000 keeps objects for the few in use.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

from pgfleet import settings as S
from pgfleet.drivers.base import Backend


@dataclass
class Runtime:
    """In-memory facts about one instance that need not survive a restart."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    backend: Backend | None = None
    clients: int = 0  # open client sessions (leases)
    busy: int = 0  # sessions with a query running or a transaction open
    # settings cached from the store for the per-transaction path (refreshed on transitions)
    policy: str | None = None
    cooldown_ms: int = S.COOLDOWN_MS.default
    running: bool = False
    last_active: float = field(default_factory=time.monotonic)
    idle_timer: asyncio.TimerHandle | None = None
    cold_timer: asyncio.TimerHandle | None = None  # warm standby -> cold
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    total_connections: int = 0
    holders: int = 0  # lifecycle operations holding or waiting for `lock`

    def in_use(self) -> bool:
        """What keeps a database from scaling to zero: any client session (`on`), or
        only a session in the middle of a query or transaction (`idle`)."""
        return self.busy > 0 if self.policy == "idle" else (self.clients > 0 or self.busy > 0)

    def idle_at_least(self, ms: int) -> bool:
        """No session was active for `ms` (less a millisecond: a timer may fire that early)."""
        return (time.monotonic() - self.last_active) * 1000 >= ms - 1

    def cancel_idle_timer(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def cancel_cold_timer(self) -> None:
        if self.cold_timer is not None:
            self.cold_timer.cancel()
            self.cold_timer = None

    def unused(self) -> bool:
        """Nothing refers to this instance's in-memory facts: they can be dropped and made
        afresh on the next use (a fleet of 10,000 keeps objects only for those in use)."""
        return (self.holders == 0 and self.clients == 0 and self.busy == 0 and self.backend is None
                and self.idle_timer is None and self.cold_timer is None)


@dataclass(frozen=True)
class Sessions:
    """A database's client sessions as callers outside the fleet may see them."""

    open: int = 0
    total: int = 0


class Runtimes:
    """The Runtime of every database in use, by uuid."""

    def __init__(self) -> None:
        self._by_uuid: dict[str, Runtime] = {}

    def get(self, uuid: str) -> Runtime | None:
        return self._by_uuid.get(uuid)

    def __getitem__(self, uuid: str) -> Runtime:
        return self._by_uuid[uuid]

    def __contains__(self, uuid: object) -> bool:
        return uuid in self._by_uuid

    def __iter__(self) -> Iterator[str]:
        """The uuids of the databases in use."""
        return iter(list(self._by_uuid))

    def values(self) -> list[Runtime]:
        return list(self._by_uuid.values())

    def of(self, uuid: str) -> Runtime:
        """The database's Runtime, made on its first use."""
        rt = self._by_uuid.get(uuid)
        if rt is None:
            rt = self._by_uuid[uuid] = Runtime()
        return rt

    @asynccontextmanager
    async def locked(self, uuid: str) -> AsyncIterator[Runtime]:
        """Hold one instance's lifecycle lock (every holder goes through here: a Runtime is
        dropped once unused, and a lock taken any other way could be dropped under it)."""
        rt = self.of(uuid)
        rt.holders += 1
        try:
            async with rt.lock:
                yield rt
        finally:
            rt.holders -= 1
            self.forget_if_unused(uuid, rt)

    def forget_if_unused(self, uuid: str, rt: Runtime) -> None:
        if rt.unused() and self._by_uuid.get(uuid) is rt:
            del self._by_uuid[uuid]

    def drop(self, uuid: str) -> None:
        """The database is gone (deleted, or its create rolled back)."""
        self._by_uuid.pop(uuid, None)

    # --- what the proxy and the API may read ---------------------------------------------
    def backend_of(self, uuid: str) -> Backend | None:
        rt = self._by_uuid.get(uuid)
        return rt.backend if rt is not None else None

    def is_known(self, uuid: str) -> bool:
        """True while the fleet holds the database in memory (from its first use to its deletion)."""
        return uuid in self._by_uuid

    def is_up(self, uuid: str) -> bool:
        """True while the database has a backend to forward to (the proxy's per-message check)."""
        rt = self._by_uuid.get(uuid)
        return rt is not None and rt.backend is not None

    def sessions(self, uuid: str) -> Sessions:
        rt = self._by_uuid.get(uuid)
        return Sessions(rt.clients, rt.total_connections) if rt is not None else Sessions()
