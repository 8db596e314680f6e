"""Benchmark: how fast a database is created, woken from standby, and connected to warm.

    .venv/bin/python bench/wake.py [--cycles 50] [--driver sandbox]

Every sample is a real client (libpq via psycopg) opening a new connection through the
pgfleet proxy (SCRAM included) and getting the result of `SELECT 1`. In one run:
  create  : POST /v1/databases until the first query result on a new connection
  wake    : database in standby; new connection until the first query result
  warm    : database running; new connection until the first query result
  direct  : the same new connection straight to the backend's socket (no proxy, no auth):
            the floor the proxy adds to
Also checks that standby databases hold no process and no memory.
Writes bench/results/wake.json and bench/results/wake.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, start_daemon, summarise, write_results  # noqa: E402

TARGETS = {"wake_p50_ms": 50, "wake_p99_ms": 150, "create_p50_ms": 300}


def first_query_ms(**conninfo) -> float:
    t = time.perf_counter()
    with psycopg.connect(**conninfo, connect_timeout=60) as conn:
        conn.execute("SELECT 1").fetchone()
    return (time.perf_counter() - t) * 1000


def progress(what: str, done: int, total: int) -> None:
    if sys.stderr.isatty() or done == total:
        end = "\n" if done == total else ""
        print(f"\r{what}: {done}/{total}", end=end, file=sys.stderr, flush=True)


def processes_of(home: Path) -> int:
    import os

    root = os.path.realpath(home)
    n = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.readlink(f"/proc/{entry.name}/cwd").startswith(root + "/"):
                    n += 1
            except OSError:
                pass
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--driver", default="sandbox")
    args = ap.parse_args()

    d = start_daemon(args.driver)
    host, port = d.proxy
    samples: dict[str, list[float]] = {"create": [], "wake": [], "warm": [], "direct": []}
    server_boot_us: list[int] = []
    try:
        # (a) create to first query
        dbs = []
        for i in range(args.cycles):
            name = f"bench{i}"
            t = time.perf_counter()
            created = d.api("POST", "/v1/databases", {"name": name})
            with psycopg.connect(host=host, port=port, dbname=name, user=name, password=created["password"],
                                 connect_timeout=60) as conn:
                conn.execute("SELECT 1").fetchone()
            samples["create"].append((time.perf_counter() - t) * 1000)
            dbs.append((name, created["password"]))
            progress("create", i + 1, args.cycles)
        # park all but one, as a real host would hold many idle databases
        for name, _ in dbs[1:]:
            d.api("PUT", f"/v1/databases/{name}/suspend")
        name, password = dbs[0]
        conninfo = dict(host=host, port=port, dbname=name, user=name, password=password)
        # (b) wake, (c) warm and (d) direct, interleaved so noise hits all alike
        for i in range(args.cycles):
            d.api("PUT", f"/v1/databases/{name}/suspend")
            samples["wake"].append(first_query_ms(**conninfo))
            server_boot_us.append(d.api("GET", f"/v1/databases/{name}")["boot_time_us"])
            samples["warm"].append(first_query_ms(**conninfo))
            backend = d.api("GET", f"/v1/databases/{name}")["backend"].removeprefix("unix:")
            samples["direct"].append(first_query_ms(host=backend, dbname="postgres", user="postgres"))
            progress("wake/warm/direct", i + 1, args.cycles)
        standby = [db for db in d.api("GET", "/v1/databases")["databases"] if db["state"] == "standby"]
        d.api("PUT", f"/v1/databases/{name}/suspend")
        standby_processes = processes_of(d.home)
    finally:
        d.stop()

    summary = {k: summarise(v) for k, v in samples.items()}
    summary["server_start"] = summarise([us / 1000 for us in server_boot_us])
    checks = {
        "wake_p50_ms": (summary["wake"]["p50"], TARGETS["wake_p50_ms"]),
        "wake_p99_ms": (summary["wake"]["p99"], TARGETS["wake_p99_ms"]),
        "create_p50_ms": (summary["create"]["p50"], TARGETS["create_p50_ms"]),
        "standby_processes": (standby_processes, 0),
    }
    result = {
        "benchmark": "wake", "driver": args.driver, "cycles": args.cycles, "machine": machine(),
        "summary_ms": summary, "samples_ms": samples,
        "ratios": {"wake_over_warm_p50": round(summary["wake"]["p50"] / summary["warm"]["p50"], 2),
                   "warm_over_direct_p50": round(summary["warm"]["p50"] / summary["direct"]["p50"], 2)},
        "standby": {"databases": len(standby) + 1, "processes": standby_processes},
        "targets": {k: {"measured": m, "target": t, "met": m <= t} for k, (m, t) in checks.items()},
    }
    path = write_results("wake", result)
    plot(samples, summary, Path(str(path).replace(".json", ".png")), args.driver)
    print(f"{'':10}{'p50':>9}{'p90':>9}{'p99':>9}   (ms, n={args.cycles})")
    for k in ("create", "wake", "warm", "direct", "server_start"):
        s = summary[k]
        print(f"{k:10}{s['p50']:>9.1f}{s['p90']:>9.1f}{s['p99']:>9.1f}")
    for k, v in result["targets"].items():
        print(f"target {k}: {v['measured']} <= {v['target']}: {'met' if v['met'] else 'NOT MET'}")
    print(f"wrote {path}")


def plot(samples: dict, summary: dict, path: Path, driver: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = ["direct", "warm", "wake", "create"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.boxplot([samples[k] for k in order], tick_labels=order, orientation="horizontal", showfliers=True)
    for i, k in enumerate(order, start=1):
        ax.annotate(f"p50 {summary[k]['p50']:.1f} ms", (summary[k]["p50"], i + 0.3), fontsize=8)
    ax.axvline(TARGETS["wake_p50_ms"], color="tab:orange", linestyle="--", linewidth=1, label="wake p50 target")
    ax.axvline(TARGETS["create_p50_ms"], color="tab:red", linestyle=":", linewidth=1, label="create p50 target")
    ax.set_xlabel("new connection until first query result (ms)")
    ax.set_title(f"pgfleet {driver}: create, wake from standby, warm connect")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
