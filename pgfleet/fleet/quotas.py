"""Admission control: configurable limits on what one pgfleet host will hold.

Limits come from (later wins) the defaults below, `<home>/quotas.json` and the
environment (`PGFLEET_QUOTA_INSTANCES`, `PGFLEET_QUOTA_LIVE_INSTANCES`,
`PGFLEET_QUOTA_LIVE_MEMORY_MB`). A create that would cross one raises
QuotaExceeded (HTTP 429). Databases in standby or stopped hold no memory, so only
live ones (starting, running, draining, stopping) count against the live limits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from pgfleet import overrides

from . import states
from .errors import InvalidRequest, QuotaExceeded

if TYPE_CHECKING:
    from .manager import Fleet

ENV_PREFIX = "PGFLEET_QUOTA_"


@dataclass
class Quotas:
    instances: int = 10_000
    live_instances: int = 1_000
    live_memory_mb: int = 256 * 1024

    @classmethod
    def load(cls, home: Path | str | None = None, environ: Mapping[str, str] | None = None) -> "Quotas":
        try:
            return overrides.load(cls(), home, "quotas.json", ENV_PREFIX, "quota", environ)
        except overrides.OverrideError as exc:
            raise InvalidRequest(str(exc)) from None

    def hard(self) -> dict[str, int]:
        return asdict(self)

    @staticmethod
    def usage(fleet: "Fleet") -> dict[str, int]:
        return fleet.store.live_usage(states.LIVE)

    def check_create(self, fleet: "Fleet", memory_mb: int) -> None:
        """A create starts the database, so it needs room in every limit."""
        used = self.usage(fleet)
        if used["instances"] + 1 > self.instances:
            raise QuotaExceeded(f"quota exceeded: {used['instances']} of {self.instances} databases exist")
        self.check_start(fleet, memory_mb)

    def check_start(self, fleet: "Fleet", memory_mb: int) -> None:
        used = self.usage(fleet)
        if used["live_instances"] + 1 > self.live_instances:
            raise QuotaExceeded(
                f"quota exceeded: {used['live_instances']} of {self.live_instances} live databases running"
            )
        if used["live_memory_mb"] + memory_mb > self.live_memory_mb:
            raise QuotaExceeded(
                f"quota exceeded: {used['live_memory_mb']} MiB + {memory_mb} MiB would pass the live memory "
                f"limit of {self.live_memory_mb} MiB"
            )


def admit(fleet: "Fleet", name: str, memory_mb: int, *, create: bool = False) -> None:
    """The quotas' check before a database becomes live (a create, or any start); raises
    QuotaExceeded, and says so in the events. `fleet.quotas` is read now: it may be replaced."""
    try:
        if create:
            fleet.quotas.check_create(fleet, memory_mb)
        else:
            fleet.quotas.check_start(fleet, memory_mb)
    except QuotaExceeded as exc:
        fleet.events.emit("quota_refused", name, reason=str(exc))
        raise
