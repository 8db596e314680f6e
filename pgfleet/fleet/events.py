"""Events: what happened to which database, for operators.

Every lifecycle transition, wake (with its latency), create, delete, failed login and
refusal (quota, connection limit) is one Event: one structured line in daemon.log (logger
`pgfleet.events`, JSON with `pgfleet up --log-format json`), kept in a bounded ring for
`pgfleet events` / the console, and handed to live subscribers (`--follow`, SSE).

Memory is bounded whatever clients do: the ring has a fixed length, subscribers are few
and each has a bounded queue (a subscriber that falls behind is dropped, not buffered
for), and events that unauthenticated clients can cause at will (failed logins,
connection-limit refusals) are rate-limited, with the number suppressed carried on the
next one that passes. Events never carry secrets: no passwords, verifiers or tokens.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, AsyncIterator

log = logging.getLogger("pgfleet.events")

RING_SIZE = 2000
MAX_SUBSCRIBERS = 32
SUBSCRIBER_QUEUE = 1000
#: kinds any network client can cause without a password: at most this many per second
NOISY_KINDS = frozenset({"auth_failure", "connection_refused"})
NOISY_PER_SECOND = 20


@dataclass(frozen=True)
class Event:
    seq: int
    at: float
    kind: str
    database: str | None
    fields: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        at = datetime.fromtimestamp(self.at, timezone.utc).isoformat(timespec="milliseconds")
        return {"seq": self.seq, "at": at.replace("+00:00", "Z"), "kind": self.kind,
                "database": self.database, **self.fields}

    def text(self) -> str:
        """The log line's message: `kind database key=value ...`."""
        words = [self.kind, self.database or "-"]
        words += [f"{k}={v}" for k, v in self.fields.items() if v is not None]
        return " ".join(str(w) for w in words)


class TooManySubscribers(Exception):
    pass


class Subscription:
    """One live follower; iterate it for events. `lost` is set if it fell behind."""

    def __init__(self, log_: "EventLog", database: str | None) -> None:
        self._log = log_
        self.database = database
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self.lost = False

    def offer(self, event: Event) -> None:
        if self.lost or (self.database is not None and event.database != self.database):
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:  # too slow a reader: dropped, never buffered for
            self.lost = True
            self._log.unsubscribe(self)
            self.queue.get_nowait()
            self.queue.put_nowait(None)

    async def next(self, timeout_s: float) -> Event | None:
        """The next event, or None after timeout_s (callers send a keep-alive then)."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout_s)
        except asyncio.TimeoutError:
            return None

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self.queue.get()
            if event is None:
                return
            yield event


class _RateLimit:
    """At most `per_second` per kind in any one-second window; counts what it refused."""

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self.window: dict[str, tuple[float, int]] = {}
        self.suppressed: dict[str, int] = {}

    def allow(self, kind: str, now: float) -> bool:
        start, count = self.window.get(kind, (0.0, 0))
        if now - start >= 1.0:
            start, count = now, 0
        if count >= self.per_second:
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
            self.window[kind] = (start, count)
            return False
        self.window[kind] = (start, count + 1)
        return True


class EventLog:
    def __init__(self, ring_size: int = RING_SIZE, noisy_per_second: int = NOISY_PER_SECOND) -> None:
        self.ring: deque[Event] = deque(maxlen=ring_size)
        self._seq = itertools.count(1)
        self._subscribers: set[Subscription] = set()
        self._limit = _RateLimit(noisy_per_second)

    def emit(self, kind: str, database: str | None, **fields: Any) -> Event | None:
        """Record one event; None if it was rate-limited away."""
        now = time.time()
        if kind in NOISY_KINDS:
            if not self._limit.allow(kind, time.monotonic()):
                return None
            suppressed = self._limit.suppressed.pop(kind, 0)
            if suppressed:
                fields["suppressed_before"] = suppressed
        event = Event(next(self._seq), now, kind, database, fields)
        self.ring.append(event)
        level = logging.WARNING if kind in NOISY_KINDS or kind == "quota_refused" else logging.INFO
        log.log(level, "%s", event.text(), extra={"event": event.to_json()})
        for sub in list(self._subscribers):
            sub.offer(event)
        return event

    def recent(self, database: str | None = None, limit: int = 100, kinds: set[str] | None = None) -> list[Event]:
        """The newest `limit` events (oldest first), optionally of one database or some kinds."""
        out: list[Event] = []
        for event in reversed(self.ring):
            if database is not None and event.database != database:
                continue
            if kinds is not None and event.kind not in kinds:
                continue
            out.append(event)
            if len(out) >= limit:
                break
        out.reverse()
        return out

    def subscribe(self, database: str | None = None) -> Subscription:
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            raise TooManySubscribers(f"at most {MAX_SUBSCRIBERS} event followers at a time")
        sub = Subscription(self, database)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)
