"""The fleet's read side, for the API, the proxy, the edge and the CLI: databases by name,
uuid or page, their history, and what they use now. Nothing here changes a database."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pgfleet.store import InstanceRow

from .errors import NotFound
from .quotas import Quotas
from .standby import is_warm
from .states import State

if TYPE_CHECKING:
    from .manager import Fleet

FOUND_CACHE = 10_000  # rows find() keeps between two writes of the store


class Queries:
    def __init__(self, fleet: "Fleet") -> None:
        self.fleet = fleet
        self.store = fleet.store
        self._found: dict[str, InstanceRow] = {}  # find()'s rows, valid while _found_at holds
        self._found_at = -1

    # --- rows ----------------------------------------------------------------------------
    def all(self) -> list[InstanceRow]:
        return self.store.all()

    def page(self, *, limit: int | None = None, after: str | None = None,
             state: str | None = None) -> list[InstanceRow]:
        """Instances by name, a page at a time (see Store.page)."""
        return self.store.page(limit=limit, after=after, state=state)

    def count_by_state(self) -> dict[str, int]:
        return self.store.count_by_state()

    def get(self, ref: str) -> InstanceRow:
        """By name or uuid; raises NotFound."""
        row = self.store.by_name(ref) or self.store.get(ref)
        if row is None:
            raise NotFound(f"database {ref!r} does not exist")
        return row

    def find(self, name: str) -> InstanceRow | None:
        """By name, from memory until the store's connection next writes anything (every
        write of this process goes through it, so this is exact): the proxy asks once per
        connection and SQL over HTTP once per request, where a SQLite read cost 40-180 us."""
        changes = self.store.db.total_changes
        if changes != self._found_at:
            self._found.clear()
            self._found_at = changes
        row = self._found.get(name)
        if row is None:
            row = self.store.by_name(name)
            if row is not None and len(self._found) < FOUND_CACHE:
                self._found[name] = row
        return row

    def find_uuid(self, uuid: str) -> InstanceRow | None:
        return self.store.get(uuid)

    def history(self, uuid: str, limit: int = 100) -> list[dict]:
        """The database's state transitions, newest first."""
        return self.store.history(uuid, limit)

    def quota_usage(self) -> tuple[Quotas, dict[str, int]]:
        """The limits in force and what counts against them now."""
        return self.fleet.quotas, Quotas.usage(self.fleet)

    # --- what the host says ----------------------------------------------------------------
    async def usage(self, row: InstanceRow) -> dict[str, int]:
        """Resources a running database uses now (rss_bytes, cpu_time_ms...); {} when not running."""
        return await self.fleet.driver.usage(self.fleet.spec(row)) if row.state == State.RUNNING else {}

    async def disk_bytes(self, row: InstanceRow) -> int | None:
        """Disk the database itself owns (its copy-on-write layer), if the driver knows."""
        return await self.fleet.driver.disk_bytes(self.fleet.spec(row))

    def memory_charged(self, row: InstanceRow) -> tuple[int, int]:
        """(bytes charged, bytes in swap) of a running or warm database; (0, 0) when cold."""
        if row.state != State.RUNNING and not is_warm(row):
            return 0, 0
        return self.fleet.driver.memory_charged(self.fleet.spec(row))

    def log_path(self, row: InstanceRow) -> Path | None:
        return self.fleet.driver.log_path(self.fleet.spec(row))
