"""Prometheus metrics at GET /metrics (the API listener, bearer token like every route).

Collected on each scrape from what the fleet and the proxies already count in plain ints:
nothing here runs on the proxy's per-query path. Three families:
- `pgfleet_*` fleet gauges: databases by state and tier, memory;
- `pgfleet_database_*` per database (label `database`): state, wakes and their latency
  histogram, create and suspend time, connections by listener, bytes, auth failures;
- `pgbouncer_*` for the pooled listener, named and labelled (database, user) as
  prometheus-community's pgbouncer_exporter names them, so PgBouncer dashboards work.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, SummaryMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pgfleet.fleet.states import State
from pgfleet.proxy.stats import DatabaseTraffic, traffic
from pgfleet.store import InstanceRow

from .common import ApiContext

router = APIRouter(tags=["meta"])

USAGE_TIMEOUT_S = 2.0
MIB = 1 << 20


def tier_of(row: InstanceRow) -> str:
    """A standby database's tier (warm: frozen, sessions kept; cold: stopped); "" otherwise."""
    if row.state != State.STANDBY:
        return ""
    return str(getattr(row, "standby_tier", None) or "cold")


@dataclass
class Snapshot:
    rows: list[InstanceRow]
    used_bytes: dict[str, int]
    listeners: dict[str, dict[str, DatabaseTraffic]] = field(default_factory=dict)


async def take_snapshot(ctx: ApiContext) -> Snapshot:
    fleet = ctx.fleet
    rows = fleet.list()
    running = [r for r in rows if r.state == State.RUNNING]

    async def used(row: InstanceRow) -> int | None:
        try:
            usage = await asyncio.wait_for(fleet.usage(row), USAGE_TIMEOUT_S)
        except Exception:  # a scrape never fails for one database
            return None
        return usage.get("rss_bytes") or usage.get("pss_bytes")

    amounts = await asyncio.gather(*(used(r) for r in running))
    snap = Snapshot(rows, {r.uuid: a for r, a in zip(running, amounts) if a is not None})
    for name, proxy in (ctx.proxies or {}).items():
        snap.listeners[name] = traffic(proxy)
    return snap


class _Collector:
    def __init__(self, ctx: ApiContext, snap: Snapshot) -> None:
        self.ctx = ctx
        self.snap = snap

    def collect(self):
        yield from self._fleet()
        yield from self._databases()
        yield from self._traffic()
        yield from self._pgbouncer()

    def _fleet(self):
        rows = self.snap.rows
        up = GaugeMetricFamily("pgfleet_up", "1 while the daemon serves")
        up.add_metric([], 1)
        yield up
        by = GaugeMetricFamily("pgfleet_databases", "Databases by state and standby tier", labels=["state", "tier"])
        counts: dict[tuple[str, str], int] = {(s.value, ""): 0 for s in State if s != State.STANDBY}
        counts.update({(State.STANDBY.value, "warm"): 0, (State.STANDBY.value, "cold"): 0})
        for r in rows:
            key = (r.state, tier_of(r))
            counts[key] = counts.get(key, 0) + 1
        for (state, tier), n in sorted(counts.items()):
            by.add_metric([state, tier], n)
        yield by
        live = [r for r in rows if r.state in (State.RUNNING, State.STARTING, State.DRAINING, State.STOPPING)]
        limit = GaugeMetricFamily("pgfleet_memory_limit_bytes", "Memory limits of live databases, summed")
        limit.add_metric([], sum(r.memory_mb for r in live) * MIB)
        yield limit
        used = GaugeMetricFamily("pgfleet_memory_used_bytes", "Memory used by running databases, summed")
        used.add_metric([], sum(self.snap.used_bytes.values()))
        yield used

    def _databases(self):
        tele = self.ctx.fleet.telemetry.by_uuid
        info = GaugeMetricFamily("pgfleet_database_info", "One per database; its state and tier as labels",
                                 labels=["database", "state", "tier", "driver", "image"])
        state = GaugeMetricFamily("pgfleet_database_running", "1 while the database runs", labels=["database"])
        mem_limit = GaugeMetricFamily("pgfleet_database_memory_limit_bytes", "Memory limit", labels=["database"])
        mem_used = GaugeMetricFamily("pgfleet_database_memory_used_bytes", "Memory in use (running only)",
                                     labels=["database"])
        starts = CounterMetricFamily("pgfleet_database_starts", "Starts since creation (the first included)",
                                     labels=["database"])
        wakes = CounterMetricFamily("pgfleet_database_wakes", "Wakes from standby seen by this daemon",
                                    labels=["database"])
        wake_h = HistogramMetricFamily("pgfleet_database_wake_seconds", "Wake latency: standby to running",
                                       labels=["database"])
        create = GaugeMetricFamily("pgfleet_database_create_seconds", "Time its creation took (this daemon)",
                                   labels=["database"])
        suspend = SummaryMetricFamily("pgfleet_database_suspend_seconds", "Time from draining to standby/stopped",
                                      labels=["database"])
        for r in self.snap.rows:
            db = [r.name]
            info.add_metric([r.name, r.state, tier_of(r), r.driver, r.image], 1)
            state.add_metric(db, 1 if r.state == State.RUNNING else 0)
            mem_limit.add_metric(db, r.memory_mb * MIB)
            if r.uuid in self.snap.used_bytes:
                mem_used.add_metric(db, self.snap.used_bytes[r.uuid])
            starts.add_metric(db, r.start_count)
            t = tele.get(r.uuid)
            wakes.add_metric(db, t.wakes.n if t else 0)
            if t is not None:
                wake_h.add_metric(db, t.wakes.cumulative(), t.wakes.total)
                if t.create_seconds is not None:
                    create.add_metric(db, t.create_seconds)
                suspend.add_metric(db, t.suspends, t.suspend_seconds_total)
        yield from (info, state, mem_limit, mem_used, starts, wakes, wake_h, create, suspend)

    def _traffic(self):
        names = {r.uuid: r.name for r in self.snap.rows}
        conns = GaugeMetricFamily("pgfleet_database_connections", "Client connections by listener and status",
                                  labels=["database", "listener", "status"])
        recv = CounterMetricFamily("pgfleet_database_received_bytes", "Bytes received from clients",
                                   labels=["database", "listener"])
        sent = CounterMetricFamily("pgfleet_database_sent_bytes", "Bytes sent to clients",
                                   labels=["database", "listener"])
        tx = CounterMetricFamily("pgfleet_database_transactions", "Transactions (pooled listener)",
                                 labels=["database"])
        wait = CounterMetricFamily("pgfleet_database_client_wait_seconds",
                                   "Time pooled clients waited for a server connection", labels=["database"])
        auth = CounterMetricFamily("pgfleet_database_auth_failures", "Failed logins", labels=["database", "listener"])
        for listener, per_db in self.snap.listeners.items():
            for uuid, t in per_db.items():
                name = names.get(uuid)
                if name is None:
                    continue
                conns.add_metric([name, listener, "active"], t.clients - t.clients_waiting)
                conns.add_metric([name, listener, "waiting"], t.clients_waiting)
                recv.add_metric([name, listener], t.bytes_received)
                sent.add_metric([name, listener], t.bytes_sent)
                auth.add_metric([name, listener], t.auth_failures)
                if listener == "pooled":
                    tx.add_metric([name], t.transactions)
                    wait.add_metric([name], t.wait_seconds)
        yield from (conns, recv, sent, tx, wait, auth)
        spares = CounterMetricFamily("pgfleet_proxy_spare_sessions",
                                     "Server sessions opened ahead as a database is frozen, by what became of them",
                                     labels=["outcome"])
        direct = (self.ctx.proxies or {}).get("direct")
        for outcome, n in (direct.direct.spares.counts if direct is not None else {}).items():
            spares.add_metric([outcome], n)
        yield spares

    def _pgbouncer(self):
        rows = {r.uuid: r for r in self.snap.rows}
        per_db = self.snap.listeners.get("pooled", {})
        labels = ["database", "user"]
        up = GaugeMetricFamily("pgbouncer_up", "The pooled listener is up")
        up.add_metric([], 1 if "pooled" in self.snap.listeners else 0)
        g = {k: GaugeMetricFamily(f"pgbouncer_pools_{k}", doc, labels=labels) for k, doc in (
            ("client_active_connections", "Client connections able to run queries"),
            ("client_waiting_connections", "Client connections waiting for a server connection"),
            ("server_active_connections", "Server connections bound to a client"),
            ("server_idle_connections", "Server connections free for a client"),
            ("server_used_connections", "Server connections idle past the check delay (always 0 here)"),
            ("server_testing_connections", "Server connections being tested (always 0 here)"),
            ("server_login_connections", "Server connections being opened"),
            ("client_maxwait_seconds", "Longest current wait for a server connection"),
        )}
        c = {k: CounterMetricFamily(f"pgbouncer_stats_{k}", doc, labels=["database"]) for k, doc in (
            ("queries_pooled", "SQL queries pooled"),
            ("sql_transactions_pooled", "SQL transactions pooled"),
            ("received_bytes", "Bytes received from clients"),
            ("sent_bytes", "Bytes sent to clients"),
            ("client_wait_seconds", "Time clients waited for a server connection"),
        )}
        for uuid, t in per_db.items():
            row = rows.get(uuid)
            if row is None:
                continue
            pool = [row.name, row.role]
            g["client_active_connections"].add_metric(pool, t.clients - t.clients_waiting)
            g["client_waiting_connections"].add_metric(pool, t.clients_waiting)
            g["server_active_connections"].add_metric(pool, t.servers_active)
            g["server_idle_connections"].add_metric(pool, t.servers_idle)
            g["server_used_connections"].add_metric(pool, 0)
            g["server_testing_connections"].add_metric(pool, 0)
            g["server_login_connections"].add_metric(pool, t.servers_login)
            g["client_maxwait_seconds"].add_metric(pool, t.maxwait_seconds)
            db = [row.name]
            c["queries_pooled"].add_metric(db, t.queries)
            c["sql_transactions_pooled"].add_metric(db, t.transactions)
            c["received_bytes"].add_metric(db, t.bytes_received)
            c["sent_bytes"].add_metric(db, t.bytes_sent)
            c["client_wait_seconds"].add_metric(db, t.wait_seconds)
        yield up
        yield from g.values()
        yield from c.values()


async def render(ctx: ApiContext) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(ctx, await take_snapshot(ctx)))
    return generate_latest(registry)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request):
    return Response(await render(request.app.state.ctx), media_type=CONTENT_TYPE_LATEST)
