"""Benchmark: how fast a database is created, woken from standby, and connected to warm.

    .venv/bin/python bench/wake.py [--cycles 50] [--driver sandbox]

Every sample is a real client (libpq via psycopg) opening a new connection through the
pgfleet proxy (SCRAM included) and getting the result of `SELECT 1`. In one run:
  create  : POST /v1/databases until the first query result on a new connection
  wake    : database in standby; new connection until the first query result
  warm    : database running; new connection until the first query result (the name
            predates warm standby: `running_new` in spirit)
  direct  : the same new connection straight to the backend's socket (no proxy, no auth):
            the floor the proxy adds to
Warm standby (frozen, memory reclaimed to swap: the daemon runs with `--swap`):
  warm_held    : `SELECT 1` on a session held open across a warm standby (policy idle)
  running_held : the same on the same session while the database runs (the floor)
  warm_new     : new connection to a warm database until the first query result
  storm_warm : N databases (--storm, default 200) in warm standby, each woken at once by a
            query on the session it held (sessions kept: what warm standby is for)
  storm_warm_new / storm_cold : the same N in warm, then cold standby, all connected
            at once by new clients; each client's time to its first query result
  RAM per warm database: memory charged to its cgroup once the freeze has settled (the
            fleet reclaims a second time SETTLE_S after it), and PSS of its processes
`wake` is the cold tier (a Postgres start). Cold standby databases hold no process.
Writes bench/results/wake.json and bench/results/wake.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, start_daemon, summarise, write_results  # noqa: E402
from pgfleet.fleet.standby import SETTLE_S  # noqa: E402

#: warm-tier cycles whose memory is measured once the freeze settled (each waits SETTLE_S)
SETTLED_SAMPLES = 10
#: swap a warm database takes (measured ~14 MiB), to size the storm's swap file
SWAP_PER_WARM_MIB = 16

TARGETS = {"wake_p50_ms": 50, "wake_p99_ms": 150, "create_p50_ms": 300,
           "warm_held_p50_ms": 5, "warm_held_p99_ms": 20, "warm_new_p50_ms": 10,
           "storm_warm_p99_ms": 1000, "warm_charged_mib": 4}


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


def cgroup_pss_kib(home: Path, uuid: str) -> int:
    """PSS of every process in a database's memory cgroup (frozen ones included)."""
    from pgfleet.drivers import cgroups
    from pgfleet.drivers.sandbox.driver import CGROUP_PARENT, _home_tag

    cg = cgroups.Cgroup(f"{CGROUP_PARENT}/{_home_tag(home / 'sandbox')}", uuid)
    total = 0
    for procs in cg.procs_files()[:1]:
        for pid in Path(procs).read_text().split():
            try:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
            except OSError:
                pass
    return total


def warm_tier(d, cycles: int, samples: dict) -> dict:
    """Held session and new connection across warm standby, interleaved with the floor."""
    host, port = d.proxy
    created = d.api("POST", "/v1/databases", {"name": "warmheld",
                                               "scale_to_zero": {"policy": "idle", "cooldown_ms": 600_000}})
    conninfo = dict(host=host, port=port, dbname="warmheld", user="warmheld", password=created["password"])
    charged, swapped, pss, at_freeze = [], [], [], []
    for k in ("running_held", "warm_held", "warm_new"):
        samples[k] = []
    with psycopg.connect(**conninfo, connect_timeout=60, autocommit=True) as held:
        held.execute("CREATE TABLE t AS SELECT g, repeat('x', 100) AS s FROM generate_series(1, 20000) g")
        for i in range(cycles):
            t = time.perf_counter()
            held.execute("SELECT 1").fetchone()
            samples["running_held"].append((time.perf_counter() - t) * 1000)
            shown = d.api("PUT", "/v1/databases/warmheld/suspend", {"tier": "warm"})
            at_freeze.append(shown["memory_charged_bytes"] / 2**20)
            if i < SETTLED_SAMPLES:  # what a warm database keeps charged once its freeze settled
                time.sleep(SETTLE_S + 0.5)
                shown = d.api("GET", "/v1/databases/warmheld")
                charged.append(shown["memory_charged_bytes"] / 2**20)
                swapped.append(shown["memory_swapped_bytes"] / 2**20)
                pss.append(cgroup_pss_kib(d.home, shown["uuid"]) / 1024)
            t = time.perf_counter()
            held.execute("SELECT 1").fetchone()
            samples["warm_held"].append((time.perf_counter() - t) * 1000)
            d.api("PUT", "/v1/databases/warmheld/suspend", {"tier": "warm"})
            samples["warm_new"].append(first_query_ms(**conninfo))
            progress("warm held/new", i + 1, cycles)
    charged.sort()
    pss.sort()
    at_freeze.sort()
    return {"charged_mib_p50": round(charged[len(charged) // 2], 2), "charged_mib_max": round(charged[-1], 2),
            "charged_at_freeze_mib_p50": round(at_freeze[len(at_freeze) // 2], 2),
            "swapped_mib_p50": round(sorted(swapped)[len(swapped) // 2], 2),
            "pss_mib_p50": round(pss[len(pss) // 2], 2) if pss else None}


def storms(d, n: int, samples: dict) -> dict:
    """N databases woken at once: from warm on the sessions they held (what warm standby is
    for: `storm_warm`), from warm by new connections (`storm_warm_new`), then from cold by new
    connections (`storm_cold`). Each client's time to its first query result."""
    import asyncio
    import resource
    from concurrent.futures import ThreadPoolExecutor

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8 * n + 256)), hard))
    host, port = d.proxy
    names = [f"storm{i}" for i in range(n)]

    def make(name: str) -> tuple[str, str]:
        created = d.api("POST", "/v1/databases", {"name": name,
                                                   "scale_to_zero": {"policy": "idle", "cooldown_ms": 3_600_000}})
        return name, created["password"]

    def to_warm(name: str) -> bool:
        """Frozen now (False: the memory manager had taken it cold already)."""
        try:
            return d.api("PUT", f"/v1/databases/{name}/suspend", {"tier": "warm"})["standby_tier"] == "warm"
        except RuntimeError as exc:
            if "is standby" in str(exc):
                return False
            raise

    def all_warm() -> int:
        with ThreadPoolExecutor(4) as pool:
            return sum(pool.map(to_warm, names))

    async def connect(name: str, password: str):
        return await psycopg.AsyncConnection.connect(host=host, port=port, dbname=name, user=name,
                                                     password=password, connect_timeout=120, autocommit=True)

    async def first_result(conn) -> None:
        await (await conn.execute("SELECT 1")).fetchone()

    async def timed(make_conn, name: str) -> float | None:
        t0 = time.perf_counter()
        try:
            await make_conn()
        except Exception as exc:
            print(f"storm client {name}: {exc}", file=sys.stderr)
            return None
        return (time.perf_counter() - t0) * 1000

    async def storm(one) -> tuple[list[float], int, float]:
        t0 = time.perf_counter()
        got = await asyncio.gather(*(timed(lambda nm=nm, pw=pw: one(nm, pw), nm) for nm, pw in dbs))
        return [g for g in got if g is not None], sum(g is None for g in got), time.perf_counter() - t0

    async def new_session(name: str, password: str) -> None:
        conn = await connect(name, password)
        try:
            await first_result(conn)
        finally:
            await conn.close()

    async def run() -> dict:
        out: dict = {"n": n}
        held: dict[str, psycopg.AsyncConnection] = {}
        sem = asyncio.Semaphore(8)

        async def hold(name: str, password: str) -> None:
            async with sem:  # a few at a time, each frozen at once: n never all run together
                held[name] = await connect(name, password)
                await first_result(held[name])
                await asyncio.to_thread(to_warm, name)
        t = time.perf_counter()
        await asyncio.gather(*(hold(nm, pw) for nm, pw in dbs))
        out["setup_s"] = round(time.perf_counter() - t + made_s, 1)
        await asyncio.sleep(SETTLE_S + 0.5)  # the last ones frozen get their second reclaim
        listed = [db for db in d.api("GET", "/v1/databases")["databases"] if db["name"] in set(names)]
        charged = sorted(db["memory_charged_bytes"] / 2**20 for db in listed if db["standby_tier"] == "warm")
        out["warm_charged_mib_p50"] = round(charged[len(charged) // 2], 2) if charged else None
        out["warm_charged_mib_p90"] = round(charged[len(charged) * 9 // 10], 2) if charged else None
        out["warm_count"] = len(charged)

        async def on_held(name: str, _password: str) -> None:
            await first_result(held[name])
        samples["storm_warm"], out["warm_failed"], out["warm_wall_s"] = await storm(on_held)
        progress("storm warm (held sessions)", 1, 1)
        await asyncio.gather(*(c.close() for c in held.values()))
        out["warm_again"] = await asyncio.to_thread(all_warm)
        samples["storm_warm_new"], out["warm_new_failed"], out["warm_new_wall_s"] = await storm(new_session)
        progress("storm warm (new connections)", 1, 1)
        with ThreadPoolExecutor(4) as pool:  # now all cold
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: list(pool.map(lambda nm: d.api("PUT", f"/v1/databases/{nm}/suspend"), names)))
        samples["storm_cold"], out["cold_failed"], out["cold_wall_s"] = await storm(new_session)
        progress("storm cold", 1, 1)
        return out

    t = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        dbs = list(pool.map(make, names))
    made_s = time.perf_counter() - t
    out = asyncio.run(run())
    for k in ("warm_wall_s", "warm_new_wall_s", "cold_wall_s"):
        out[k] = round(out[k], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--driver", default="sandbox")
    ap.add_argument("--swap", default="auto", help="swap file the daemon makes for the warm tier (0: none; auto: "
                    "4G, or room for the storm's databases: a warm one has ~14 MiB in swap, and zswap still "
                    "takes a swap slot per page)")
    ap.add_argument("--storm", type=int, default=200, help="databases woken at once (0: no storms)")
    args = ap.parse_args()

    if args.swap == "auto":
        args.swap = f"{max(4, -(-args.storm * SWAP_PER_WARM_MIB // 1024) + 2)}G"
    if args.storm:
        # the storm's clients all come from 127.0.0.1 (one source, as behind a load balancer):
        # the default pre-auth cap of 256 per source would refuse the rest (docs/security.md);
        # and all N are live at once
        os.environ.setdefault("PGFLEET_LIMIT_MAX_PENDING_PER_SOURCE", str(args.storm + 64))
        os.environ.setdefault("PGFLEET_QUOTA_LIVE_INSTANCES", str(args.storm + 64))
        os.environ.setdefault("PGFLEET_QUOTA_LIVE_MEMORY_MB", str(10**7))
    d = start_daemon(args.driver, ("--swap", args.swap) if args.swap != "0" else ())
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
            samples["direct"].append(first_query_ms(host=backend, dbname=name, user="postgres"))
            progress("wake/warm/direct", i + 1, args.cycles)
        standby = [db for db in d.api("GET", "/v1/databases")["databases"] if db["state"] == "standby"]
        d.api("PUT", f"/v1/databases/{name}/suspend")
        standby_processes = processes_of(d.home)
        warm = warm_tier(d, args.cycles, samples)
        if args.storm:
            warm["storm"] = storms(d, args.storm, samples)
        status = d.api("GET", "/v1/status")
    finally:
        d.stop()

    summary = {k: summarise(v) for k, v in samples.items()}
    summary["server_start"] = summarise([us / 1000 for us in server_boot_us])
    checks = {
        "warm_held_p50_ms": (summary["warm_held"]["p50"], TARGETS["warm_held_p50_ms"]),
        "warm_held_p99_ms": (summary["warm_held"]["p99"], TARGETS["warm_held_p99_ms"]),
        "warm_new_p50_ms": (summary["warm_new"]["p50"], TARGETS["warm_new_p50_ms"]),
        "warm_charged_mib": (warm["charged_mib_p50"], TARGETS["warm_charged_mib"]),
        "wake_p50_ms": (summary["wake"]["p50"], TARGETS["wake_p50_ms"]),
        "wake_p99_ms": (summary["wake"]["p99"], TARGETS["wake_p99_ms"]),
        "create_p50_ms": (summary["create"]["p50"], TARGETS["create_p50_ms"]),
        "standby_processes": (standby_processes, 0),
    }
    if "storm" in warm:
        checks["storm_warm_p99_ms"] = (summary["storm_warm"]["p99"], TARGETS["storm_warm_p99_ms"])
        checks["storm_warm_all_served"] = (warm["storm"]["warm_failed"], 0)
    result = {
        "benchmark": "wake", "driver": args.driver, "cycles": args.cycles, "machine": machine(),
        "summary_ms": summary, "samples_ms": samples,
        "ratios": {"wake_over_warm_p50": round(summary["wake"]["p50"] / summary["warm"]["p50"], 2),
                   "warm_over_direct_p50": round(summary["warm"]["p50"] / summary["direct"]["p50"], 2),
                   # the warm tier against its floors, measured side by side (robust on a loaded host)
                   "warm_held_over_running_held_p50": round(summary["warm_held"]["p50"] / summary["running_held"]["p50"], 2),
                   "warm_new_over_running_new_p50": round(summary["warm_new"]["p50"] / summary["warm"]["p50"], 2),
                   "cold_wake_over_warm_new_p50": round(summary["wake"]["p50"] / summary["warm_new"]["p50"], 2)},
        "standby": {"databases": len(standby) + 1, "processes": standby_processes},
        "warm": warm, "standby_mode": status.get("standby"),
        "targets": {k: {"measured": m, "target": t, "met": m <= t} for k, (m, t) in checks.items()},
    }
    path = write_results("wake", result)
    plot(samples, summary, Path(str(path).replace(".json", ".png")), args.driver)
    print(f"{'':10}{'p50':>9}{'p90':>9}{'p99':>9}   (ms, n={args.cycles})")
    for k in [k for k in summary if summary[k]["n"]]:
        s = summary[k]
        print(f"{k:10}{s['p50']:>9.1f}{s['p90']:>9.1f}{s['p99']:>9.1f}")
    for k, v in result["targets"].items():
        print(f"target {k}: {v['measured']} <= {v['target']}: {'met' if v['met'] else 'NOT MET'}")
    for k, v in result["ratios"].items():
        print(f"ratio {k}: {v}")
    print(f"wrote {path}")


def plot(samples: dict, summary: dict, path: Path, driver: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [k for k in ("direct", "warm", "running_held", "warm_held", "warm_new", "wake", "storm_warm",
                         "storm_warm_new", "storm_cold", "create") if samples.get(k)]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.boxplot([samples[k] for k in order], tick_labels=order, orientation="horizontal", showfliers=True)
    for i, k in enumerate(order, start=1):
        ax.annotate(f"p50 {summary[k]['p50']:.1f} ms", (summary[k]["p50"], i + 0.3), fontsize=8)
    ax.axvline(TARGETS["wake_p50_ms"], color="tab:orange", linestyle="--", linewidth=1, label="wake p50 target")
    ax.axvline(TARGETS["create_p50_ms"], color="tab:red", linestyle=":", linewidth=1, label="create p50 target")
    ax.set_xlabel("until first query result (ms; held: one query on an open session)")
    ax.set_xscale("log")
    ax.set_title(f"pgfleet {driver}: create, wake from cold and warm standby, storms")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
