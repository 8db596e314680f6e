"""The host memory manager: the fleet's databases stay within a memory budget.

Every few hundred milliseconds it sums what the running and warm databases have charged.
Over the budget, or when the kernel reports memory pressure (PSI `full`, /proc/pressure/memory,
where present), the least recently used idle databases are demoted a tier: running -> warm
(frozen, memory reclaimed) first, then warm -> cold (stopped). A database with a busy
session (a query or transaction running, or under policy `on` any open session) is never
touched. Without swap a freeze frees nothing, so running databases go straight to cold.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .periodic import Chore
from .standby import is_warm
from .states import State

if TYPE_CHECKING:
    from .manager import Fleet

log = logging.getLogger(__name__)

PSI_MEMORY = Path("/proc/pressure/memory")
#: share of host RAM the fleet may use when no budget is given
DEFAULT_BUDGET_SHARE = 0.75
#: "full" stall share over 10 s (percent) above which the host is under pressure. Not
#: "some": the fleet's own reclaim (every freeze pushes memory out) stalls the thread doing
#: it, which "some" counts; a storm of freezes read as pressure and demoted held sessions
#: to cold. "full" (every runnable task stalled at once) is what hurts the host.
PSI_THRESHOLD = 10.0
INTERVAL_S = 0.5
#: a warm database's charge barely moves while it is frozen: read again after this long
WARM_CHARGE_TTL_S = 10.0
#: what a freeze with reclaim is expected to leave charged (measured 2-8 MiB)
WARM_RESIDUE_BYTES = 6 << 20


def host_memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise OSError("no MemTotal in /proc/meminfo")


def default_budget_bytes() -> int:
    return int(host_memory_bytes() * DEFAULT_BUDGET_SHARE)


def memory_pressure(path: Path = PSI_MEMORY) -> float | None:
    """PSI `full avg10` (percent), or None where the kernel has no PSI."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("full "):
            for word in line.split():
                if word.startswith("avg10="):
                    return float(word[6:])
    return None


@dataclass
class MemoryReport:
    budget_bytes: int
    charged_bytes: int = 0
    pressure: float | None = None
    demoted: list[tuple[str, str]] = field(default_factory=list)  # (name, "warm" | "cold")


class MemoryManager:
    def __init__(self, fleet: "Fleet", budget_bytes: int | None = None, interval_s: float = INTERVAL_S) -> None:
        self.fleet = fleet
        self.budget_bytes = budget_bytes if budget_bytes is not None else default_budget_bytes()
        self.last = MemoryReport(self.budget_bytes)
        self._warm_charged: dict[str, tuple[int, float]] = {}  # uuid -> (bytes, when read)
        self._chore = Chore(interval_s, self.tick, "memory manager")

    def status(self) -> dict:
        last = self.last
        return {"budget_bytes": self.budget_bytes, "charged_bytes": last.charged_bytes,
                "pressure_full_avg10": last.pressure}

    def start(self) -> None:
        self._chore.start()

    async def close(self) -> None:
        await self._chore.close()

    def charged(self) -> dict[str, int]:
        """uuid -> bytes charged, for every database with processes (running or warm). A
        warm one's is read again only every WARM_CHARGE_TTL_S: with a thousand warm databases
        a tick read 2,000 cgroup files on the event loop, twice a second."""
        fleet = self.fleet
        now = time.monotonic()
        out, warm_seen = {}, {}
        for row in fleet.store.with_processes():
            if is_warm(row):
                cached = self._warm_charged.get(row.uuid)
                if cached is None or now - cached[1] > WARM_CHARGE_TTL_S:
                    cached = (fleet.driver.memory_charged(fleet.spec(row))[0], now)
                warm_seen[row.uuid] = cached
                out[row.uuid] = cached[0]
            else:
                out[row.uuid] = fleet.driver.memory_charged(fleet.spec(row))[0]
        self._warm_charged = warm_seen
        return out

    async def tick(self) -> MemoryReport:
        """One look at the host; demotes what it must. Returns what it saw and did."""
        charged = self.charged()
        report = MemoryReport(self.budget_bytes, sum(charged.values()), memory_pressure())
        self.last = report
        over = report.charged_bytes - self.budget_bytes
        if report.pressure is not None and report.pressure > PSI_THRESHOLD:
            over = max(over, 1)  # at least one step
        if over <= 0:
            return report
        plan = self._plan(charged, over)
        results = await asyncio.gather(*(self._demote(uuid, tier) for uuid, tier in plan), return_exceptions=True)
        for (uuid, tier), res in zip(plan, results):
            if isinstance(res, BaseException):
                log.error("demoting %s to %s failed: %s", uuid, tier, res)
            elif res:
                row = self.fleet.store.get(uuid)
                report.demoted.append((row.name if row else uuid, tier))
        if report.demoted:
            log.info("memory: %.0f MiB charged, budget %.0f MiB, pressure %s: demoted %s",
                     report.charged_bytes / 2**20, self.budget_bytes / 2**20, report.pressure,
                     ", ".join(f"{n} -> {t}" for n, t in report.demoted))
        return report

    def _plan(self, charged: dict[str, int], over: int) -> list[tuple[str, str]]:
        """Least recently used first: idle running ones to warm (to cold without swap),
        then warm ones to cold, until the expected saving covers `over`."""
        fleet = self.fleet
        reclaim = fleet.warm.mode == "reclaim"
        running, warm = [], []
        for uuid in charged:
            rt = fleet.rt.get(uuid)
            row = fleet.store.get(uuid)
            if row is None or row.deleting:
                continue
            last = rt.last_active if rt is not None else 0.0
            if row.state == State.RUNNING:
                if rt is None or fleet.in_use(uuid):
                    continue  # a busy session: never touched
                running.append((last, uuid))
            elif not fleet.in_use(uuid):  # a held session's query waiting for the thaw: busy
                warm.append((last, uuid))
        plan: list[tuple[str, str]] = []
        saved = 0
        for _, uuid in sorted(running):
            if saved >= over:
                return plan
            if reclaim:
                plan.append((uuid, "warm"))
                saved += max(0, charged[uuid] - WARM_RESIDUE_BYTES)
            else:
                plan.append((uuid, "cold"))
                saved += charged[uuid]
        for _, uuid in sorted(warm):
            if saved >= over:
                break
            plan.append((uuid, "cold"))
            saved += charged[uuid]
        return plan

    async def _demote(self, uuid: str, tier: str) -> bool:
        fleet = self.fleet
        row = fleet.store.get(uuid)
        if row is None:
            return False
        if is_warm(row):
            return await fleet.warm.to_cold(uuid, "host memory", if_unused=True)
        if tier == "warm":
            return await fleet.warm.enter(uuid, "host memory", only_if_idle=False)
        after = await fleet.suspend(uuid, reason="host memory", drain_timeout_s=0, if_unused=True)
        return after.state == State.STANDBY
