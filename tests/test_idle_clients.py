"""Many idle clients: 1,200 open pooled connections hold a handful of server connections,
and the proxy's memory grows by a bounded amount per client (issue #4, limits)."""

from __future__ import annotations

import asyncio
import resource
from pathlib import Path

import psycopg

CLIENTS = 1200
POOL_SIZE = 5
MAX_BYTES_PER_IDLE_CLIENT = 48 * 1024  # an authenticated idle client: transport, buffers, state


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _raise_own_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed), hard))


async def _open(uri: str, password: str, n: int, batch: int = 100) -> list[psycopg.AsyncConnection]:
    conns: list[psycopg.AsyncConnection] = []
    for start in range(0, n, batch):
        conns += await asyncio.gather(*(
            psycopg.AsyncConnection.connect(uri, password=password, sslmode="disable", autocommit=True,
                                            connect_timeout=60)
            for _ in range(min(batch, n - start))))
    return conns


def test_a_thousand_idle_pooled_clients_cost_little_and_hold_few_server_connections(daemon):
    _raise_own_fd_limit(CLIENTS + 512)
    created = daemon.json("db", "create", "idlers", "--pool-size", str(POOL_SIZE),
                          "--max-pooled", str(CLIENTS + 100))
    uri, password = created["pooled_uri"], created["password"]
    pid = int(daemon.info["pid"])

    async def scenario() -> tuple[int, int, int, list[int], int]:
        warm = await _open(uri, password, 20)  # the pool, caches and code paths exist before we measure
        for c in warm:
            await (await c.execute("SELECT 1")).fetchone()
        before = rss_bytes(pid)
        conns = await _open(uri, password, CLIENTS)
        after = rss_bytes(pid)
        shown = daemon.json("db", "show", "idlers")
        try:
            # every client still works, and they share the pool's few server connections
            answers = [(await (await c.execute("SELECT %s::int", (i,))).fetchone())[0]
                       for i, c in enumerate(conns[::100])]
            # every client backend of the database is one of the pool's server connections (which
            # carry their clients' application_name, so they are counted by database)
            backends = (await (await conns[0].execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend'")).fetchone())[0]
        finally:
            for c in conns + warm:
                await c.close()
        return before, after, shown["clients"], answers, backends

    before, after, clients, answers, backends = asyncio.run(scenario())
    assert clients >= CLIENTS
    assert answers == list(range(0, CLIENTS // 100))
    assert 1 <= backends <= POOL_SIZE
    per_client = (after - before) / CLIENTS
    assert per_client < MAX_BYTES_PER_IDLE_CLIENT, (
        f"{per_client / 1024:.1f} KiB per idle pooled client (RSS {before >> 20} -> {after >> 20} MiB)")
