"""What one listener knows about each database's traffic, read on a metrics scrape from the
plain counters the proxy keeps on the way (nothing here runs per query)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .client_state import ClientPhase

if TYPE_CHECKING:
    from .server import ProxyServer


@dataclass
class ProxyStats:
    """One listener's counters."""

    connections: int = 0
    active: int = 0
    auth_failures: int = 0
    refused_limit: int = 0
    per_database: dict[str, int] = field(default_factory=dict)
    #: per database uuid, read on a metrics scrape
    auth_failures_by_db: dict[str, int] = field(default_factory=dict)


@dataclass
class DatabaseTraffic:
    clients: int = 0  # client sessions on this listener (authenticating included)
    clients_waiting: int = 0  # pooled clients waiting for a server connection
    maxwait_seconds: float = 0.0  # the longest current wait
    servers_active: int = 0  # pooled server connections bound to a client
    servers_idle: int = 0
    servers_login: int = 0  # being opened
    bytes_received: int = 0  # from clients
    bytes_sent: int = 0  # to clients
    queries: int = 0  # pooled only: ReadyForQuery messages
    transactions: int = 0  # pooled only
    wait_seconds: float = 0.0  # pooled only: clients' total wait for a server connection
    auth_failures: int = 0


def traffic(proxy: "ProxyServer") -> dict[str, DatabaseTraffic]:
    """Per database uuid."""
    out: dict[str, DatabaseTraffic] = {}

    def of(uuid: str) -> DatabaseTraffic:
        t = out.get(uuid)
        if t is None:
            t = out[uuid] = DatabaseTraffic()
        return t

    for uuid, n in proxy.stats.per_database.items():
        of(uuid).clients = n
    for uuid, n in proxy.stats.auth_failures_by_db.items():
        of(uuid).auth_failures = n
    for uuid, (received, sent) in proxy.relayed.items():
        t = of(uuid)
        t.bytes_received += received
        t.bytes_sent += sent
    for uuid, relays in proxy.relays.items():
        t = of(uuid)
        for relay in relays:
            t.bytes_received += relay.client_side.count
            t.bytes_sent += relay.server_side.count
    now = time.monotonic()
    for uuid, pool in proxy.pools.items():
        t = of(uuid)
        waiting = [c for c in pool.queued if c.phase is ClientPhase.WAITING]
        t.clients_waiting = len(waiting) + len(pool.waiters)
        since = [c.wait_since for c in waiting if c.wait_since]
        t.maxwait_seconds = now - min(since) if since else 0.0
        t.servers_idle = len(pool.idle)
        t.servers_active = len(pool.conns) - len(pool.idle)
        t.servers_login = pool._opening
        t.bytes_received += pool.bytes_received
        t.bytes_sent += pool.bytes_sent
        t.queries = pool.queries
        t.transactions = pool.transactions
        t.wait_seconds = pool.wait_seconds
    return out
