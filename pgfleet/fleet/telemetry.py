"""Per-database lifecycle numbers (wakes, their latency, create and suspend time), kept as
plain ints and floats: written on lifecycle steps (never per query), read on a scrape."""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field

#: wake-latency histogram bounds, seconds (targets: p50 <= 50 ms, p99 <= 150 ms)
WAKE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: recent wakes kept per database (the console's sparkline)
RECENT_WAKES = 60


@dataclass
class Histogram:
    bounds: tuple[float, ...] = WAKE_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(WAKE_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.n += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus buckets: (upper bound, observations at or below it), ending with +Inf."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


@dataclass
class DatabaseTelemetry:
    wakes: Histogram = field(default_factory=Histogram)
    #: (unix time, seconds) of the latest wakes
    recent_wakes: deque = field(default_factory=lambda: deque(maxlen=RECENT_WAKES))
    create_seconds: float | None = None
    suspends: int = 0
    suspend_seconds_total: float = 0.0
    last_suspend_seconds: float | None = None


class Telemetry:
    def __init__(self) -> None:
        self.by_uuid: dict[str, DatabaseTelemetry] = {}

    def of(self, uuid: str) -> DatabaseTelemetry:
        t = self.by_uuid.get(uuid)
        if t is None:
            t = self.by_uuid[uuid] = DatabaseTelemetry()
        return t

    def wake(self, uuid: str, at: float, seconds: float) -> None:
        t = self.of(uuid)
        t.wakes.observe(seconds)
        t.recent_wakes.append((at, seconds))

    def created(self, uuid: str, seconds: float) -> None:
        self.of(uuid).create_seconds = seconds

    def suspended(self, uuid: str, seconds: float) -> None:
        t = self.of(uuid)
        t.suspends += 1
        t.suspend_seconds_total += seconds
        t.last_suspend_seconds = seconds

    def forget(self, uuid: str) -> None:
        self.by_uuid.pop(uuid, None)
