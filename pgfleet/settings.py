"""Every database setting's default and bounds, in one place.

The store's schema and row defaults, the fleet's validation, the API models, the CLI options
and the Kubernetes CRD all read them from here, so they cannot disagree. Plain data only:
every layer may import this module.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bounds:
    """An integer setting: its default and the closed range it may take."""

    default: int
    min: int
    max: int
    #: 0 is also allowed, meaning "none" (no limit, no cap)
    zero_is_none: bool = False

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int) or isinstance(value, bool):
            return False
        return (self.zero_is_none and value == 0) or self.min <= value <= self.max

    @property
    def lowest(self) -> int:
        """The least value accepted (0 where 0 means none)."""
        return 0 if self.zero_is_none else self.min


#: memory limit of one database, MiB
MEMORY_MB = Bounds(default=128, min=64, max=16384)
#: time without clients before scale to zero (30 days at most)
COOLDOWN_MS = Bounds(default=300_000, min=0, max=30 * 86_400_000)
#: disk limit of one database, MiB (0: no limit of its own); it can only grow
DISK_MB = Bounds(default=0, min=128, max=16 * 1024 * 1024, zero_is_none=True)
#: CPU cap in percent of one CPU (0: none)
CPU_PCT = Bounds(default=0, min=10, max=6400, zero_is_none=True)
#: warm standby (frozen) this long, then cold (or sooner when the host needs memory)
COLD_AFTER_MS = Bounds(default=3_600_000, min=0, max=30 * 86_400_000)
#: scale-to-zero policies; `idle` needs a driver that keeps sessions across a suspend
POLICIES = ("on", "off", "idle")
DEFAULT_POLICY = "on"
#: server connections of the pooled listener (Postgres allows 100 with some reserved)
POOL_SIZE = Bounds(default=20, min=1, max=90)
#: clients at once on the pooled listener
MAX_POOLED_CLIENTS = Bounds(default=200, min=1, max=100_000)
#: clients at once on the direct listener (each holds a server connection)
MAX_DIRECT_CLIENTS = Bounds(default=50, min=1, max=90)
#: how long a suspend or stop waits for clients to leave before closing them
DRAIN_TIMEOUT_MS = Bounds(default=10_000, min=0, max=3_600_000)
DEFAULT_DRAIN_TIMEOUT_S = DRAIN_TIMEOUT_MS.default / 1000
