"""What keeps hostile network clients from exhausting the proxy (issue 10, items 5, 7, 9).

One `ProxyGuards` is shared by every listener of a daemon (direct, pooled, and any other
front end that authenticates clients), so the totals below are per daemon:

- `PendingConnections`: connections that have not authenticated yet are capped in total,
  per source address and per database; they never count against a database's own
  connection limits (those count authenticated sessions only).
- `LoginThrottle`: after repeated failed logins of a role from one source address, that
  pair must wait (doubling) before it may try again. (Every failure and refusal is an
  event with its source, emitted by the proxy: pgfleet.fleet.events.)
- `MemoryBudget`: the bytes the pooler holds on clients' behalf (messages it must read whole,
  remembered statement texts), capped across all clients.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Mapping
from dataclasses import dataclass, field

from pgfleet import overrides
from pgfleet.pgwire.messages import MAX_READ_WHOLE

from .errors import ClientError

ENV_PREFIX = "PGFLEET_LIMIT_"


@dataclass(frozen=True)
class GuardLimits:
    #: the whole unauthenticated phase (TLS, startup packet, SCRAM) must end within this
    startup_timeout_s: float = 10.0
    #: high enough for an application server's pool connecting all at once (hundreds at a time)
    max_pending: int = 4096
    max_pending_per_source: int = 256
    max_pending_per_database: int = 256
    #: failed logins of one role from one source before it must wait
    free_login_failures: int = 5
    #: failed logins from one source (any role) before the source must wait
    free_source_failures: int = 50
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    #: a run of failures older than this is forgotten
    forget_failures_s: float = 600.0
    max_tracked_logins: int = 10_000
    #: one message the pooler reads whole (e.g. a named Parse) may not be longer
    max_read_whole: int = MAX_READ_WHOLE
    #: what the pooler may hold for all clients together (messages read whole, statement texts)
    memory_budget: int = 128 << 20

    @classmethod
    def load(cls, home: Path | str | None = None, environ: Mapping[str, str] | None = None) -> "GuardLimits":
        """The defaults, then `<home>/limits.json`, then PGFLEET_LIMIT_<FIELD> (e.g. behind a
        load balancer every client has one source address: PGFLEET_LIMIT_MAX_PENDING_PER_SOURCE)."""
        return overrides.load(cls(), home, "limits.json", ENV_PREFIX, "limit", environ)


class Pending:
    """One unauthenticated connection's place; `leave()` once it authenticated or ended."""

    __slots__ = ("_owner", "source", "database")

    def __init__(self, owner: "PendingConnections", source: str) -> None:
        self._owner = owner
        self.source = source
        self.database: str | None = None

    def to_database(self, key: str) -> None:
        """Count it against the database it asked for (raises ClientError over the cap)."""
        owner = self._owner
        if self.database is not None or owner is None:
            return
        n = owner.by_database.get(key, 0)
        if n >= owner.limits.max_pending_per_database:
            owner.refused += 1
            raise ClientError("53300", "too many connections are authenticating to this database; retry shortly")
        owner.by_database[key] = n + 1
        self.database = key

    def leave(self) -> None:
        owner, self._owner = self._owner, None
        if owner is None:
            return
        owner.total -= 1
        _decrement(owner.by_source, self.source)
        if self.database is not None:
            _decrement(owner.by_database, self.database)


class PendingConnections:
    def __init__(self, limits: GuardLimits) -> None:
        self.limits = limits
        self.total = 0
        self.by_source: dict[str, int] = {}
        self.by_database: dict[str, int] = {}
        self.refused = 0

    def enter(self, source: str) -> Pending:
        """A new connection from `source` (raises ClientError 53300 over a cap)."""
        limits = self.limits
        if self.total >= limits.max_pending:
            self.refused += 1
            raise ClientError("53300", "too many connections are authenticating; retry shortly")
        n = self.by_source.get(source, 0)
        if n >= limits.max_pending_per_source:
            self.refused += 1
            raise ClientError("53300", "too many connections from your address are authenticating; retry shortly")
        self.total += 1
        self.by_source[source] = n + 1
        return Pending(self, source)


def _decrement(counts: dict[str, int], key: str) -> None:
    n = counts.get(key, 1) - 1
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    blocked_until: float = 0.0


class LoginThrottle:
    """Backoff per (role, source address) and per source address after failed logins."""

    def __init__(self, limits: GuardLimits, clock=time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._entries: OrderedDict[tuple[str, str], _Failures] = OrderedDict()
        self.refused = 0

    def check(self, role: str, source: str) -> None:
        """Raises ClientError while this role (or any role) from this source must wait."""
        now = self.clock()
        for key in ((role[:63], source), ("", source)):
            entry = self._entries.get(key)
            if entry is not None and now < entry.blocked_until:
                self.refused += 1
                wait = entry.blocked_until - now
                raise ClientError(
                    "28000", "too many failed login attempts from your address; retry later",
                    detail=f"retry in {wait:.0f} s" if wait >= 1 else "retry in less than a second")

    def failed(self, role: str, source: str) -> int:
        """Count a failed login; returns the failures of this role from this source in a row."""
        limits = self.limits
        counts = []
        for key, free in (((role[:63], source), limits.free_login_failures),
                          (("", source), limits.free_source_failures)):
            entry = self._bump(key)
            counts.append(entry.count)
            over = entry.count - free
            if over >= 0:
                delay = min(limits.backoff_max_s, limits.backoff_base_s * (2 ** min(over, 30)))
                entry.blocked_until = entry.last + delay
        return counts[0]

    def succeeded(self, role: str, source: str) -> None:
        self._entries.pop((role[:63], source), None)

    def _bump(self, key: tuple[str, str]) -> _Failures:
        now = self.clock()
        entries = self._entries
        entry = entries.get(key)
        if entry is None or now - entry.last > self.limits.forget_failures_s:
            entry = entries[key] = _Failures()
            while len(entries) > self.limits.max_tracked_logins:
                entries.popitem(last=False)
        entries.move_to_end(key)
        entry.count += 1
        entry.last = now
        return entry


class MemoryBudget:
    """Bytes held on clients' behalf, all clients together."""

    __slots__ = ("total", "used", "refused")

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self.refused = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.total:
            self.refused += 1
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used = max(0, self.used - n)


@dataclass
class ProxyGuards:
    """One per daemon, shared by all its listeners."""

    limits: GuardLimits = field(default_factory=GuardLimits)
    pending: PendingConnections = field(init=False)
    logins: LoginThrottle = field(init=False)
    memory: MemoryBudget = field(init=False)

    def __post_init__(self) -> None:
        self.pending = PendingConnections(self.limits)
        self.logins = LoginThrottle(self.limits)
        self.memory = MemoryBudget(self.limits.memory_budget)

    def stats(self) -> dict[str, int]:
        return {"authenticating": self.pending.total, "refused_authenticating": self.pending.refused,
                "refused_backoff": self.logins.refused, "pooler_bytes_held": self.memory.used,
                "refused_memory": self.memory.refused}
