"""/metrics: fleet, per-database and pgbouncer_exporter-named series, scraped from a real
daemon after real traffic through both listeners."""

from __future__ import annotations

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families


def scrape(daemon) -> dict[str, list]:
    token = (daemon.home / "token").read_text().strip()
    resp = httpx.get(daemon.info["api_url"] + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def value(samples, name, **labels) -> float:
    matching = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) == 1, f"{name}{labels}: {matching} in {samples.get(name)}"
    return matching[0]


def test_metrics_after_real_traffic(daemon):
    created = daemon.json("db", "create", "shop")
    daemon.cli("db", "create", "idle")
    daemon.cli("db", "suspend", "idle")
    with psycopg.connect(created["pooled_uri"], connect_timeout=60, autocommit=True) as conn:
        for i in range(5):
            conn.execute("SELECT %s", (i,))
        with conn.transaction():
            conn.execute("SELECT 1")
    with psycopg.connect(created["uri"], connect_timeout=60) as conn:
        conn.execute("SELECT repeat('x', 100000)").fetchone()
    daemon.cli("db", "suspend", "shop")
    with psycopg.connect(created["uri"], connect_timeout=60) as conn:  # a wake
        conn.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(created["pooled_uri"].replace(created["password"], "nope"), connect_timeout=60)

    s = scrape(daemon)
    assert value(s, "pgfleet_up") == 1
    # (suspend may leave a database warm or cold, and an idle one may be frozen meanwhile: the
    # states are counted, whichever they are)
    assert sum(x.value for x in s["pgfleet_databases"]) == 2
    assert {x.labels["tier"] for x in s["pgfleet_databases"] if x.labels["state"] == "standby"} == {"warm", "cold"}
    assert value(s, "pgfleet_memory_used_bytes") >= 0
    assert value(s, "pgfleet_database_info", database="shop") == 1
    assert value(s, "pgfleet_database_running", database="shop") in (0, 1)
    assert value(s, "pgfleet_database_wakes_total", database="shop") >= 1
    assert value(s, "pgfleet_database_wake_seconds_count", database="shop") >= 1
    assert 0 < value(s, "pgfleet_database_wake_seconds_sum", database="shop") < 60
    assert value(s, "pgfleet_database_wake_seconds_bucket", database="shop", le="+Inf") >= 1
    assert value(s, "pgfleet_database_create_seconds", database="shop") > 0
    assert value(s, "pgfleet_database_suspend_seconds_count", database="shop") >= 0
    assert value(s, "pgfleet_database_sent_bytes_total", database="shop", listener="direct") > 100_000
    # libpq (sslmode=prefer) tries again without TLS after a failed login: 1 or 2
    assert value(s, "pgfleet_database_auth_failures_total", database="shop", listener="pooled") >= 1
    # the pooler, as pgbouncer_exporter names it
    assert value(s, "pgbouncer_up") == 1
    assert value(s, "pgbouncer_stats_queries_pooled_total", database="shop") >= 7
    assert value(s, "pgbouncer_stats_sql_transactions_pooled_total", database="shop") >= 6
    assert value(s, "pgbouncer_stats_received_bytes_total", database="shop") > 0
    assert value(s, "pgbouncer_stats_sent_bytes_total", database="shop") > 0
    assert value(s, "pgbouncer_stats_client_wait_seconds_total", database="shop") >= 0
    assert value(s, "pgbouncer_pools_client_active_connections", database="shop", user="shop") == 0
    assert value(s, "pgbouncer_pools_server_idle_connections", database="shop", user="shop") >= 0
    # no secrets in the scrape
    text = httpx.get(daemon.info["api_url"] + "/metrics", timeout=30,
                     headers={"Authorization": "Bearer " + (daemon.home / "token").read_text().strip()}).text
    assert created["password"] not in text and "SCRAM" not in text

    # every series the Grafana dashboard in deploy/ queries is one the daemon exports
    import json
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "deploy/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"\b((?:pgfleet|pgbouncer)_[a-z_]+)", e)}
    assert used and used <= set(s), used - set(s)
