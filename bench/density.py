"""Benchmark: many databases on one host (issue 12).

    .venv/bin/python bench/density.py [--databases 10000] [--storm 1000] [--serial 100]

One throwaway daemon (sandbox driver). In one run:
  create   : the first --serial databases one at a time, the rest with 8 concurrent API
             clients (POST /v1/databases, autostart=false: ready in standby, the first
             connection wakes it); per-create latency and creates/s
  disk     : bytes the fresh databases own (du of the instances directory / N), and the
             copy-on-write layer of a database after its first start (db show disk_bytes)
  list     : GET /v1/databases with all N, and one page of 100
  rss      : daemon RSS with N defined
  storm    : --storm standby databases, one new client each, all at once: every client
             served? latency from connect to first result; then each keeps an idle
             session open: memory per awake database (PSS of its processes) and daemon RSS
  restart  : `pgfleet down` (suspends the awake ones) and `up` until it serves; then kill -9
             with --restart-running databases awake and `up` again (recovery re-attaches)
Writes bench/results/density.json and density.png. Everything it made is removed at the end
(daemon stopped, no mount left, home deleted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# the repository root instead of bench/ first on the path (bench.common, and no module in
# bench/ can shadow the standard library)
sys.path[0] = str(Path(__file__).resolve().parent.parent)
import httpx  # noqa: E402
import psycopg  # noqa: E402

from bench.common import PGFLEET, BenchDaemon, machine, summarise, write_results  # noqa: E402

TARGETS = {
    "disk_per_fresh_database_mb": ("<=", 2.0),
    "create_p50_ms_serial": ("<=", 50.0),
    "creates_per_s_8_concurrent": (">=", 50.0),
    "list_all_s": ("<=", 1.0),
    "daemon_rss_mib_defined": ("<=", 200.0),
    "daemon_rss_mib_awake": ("<=", 300.0),
    "restart_serving_s": ("<=", 10.0),
    "storm_served_fraction": (">=", 1.0),
}


class Daemon:
    def __init__(self, home: Path, env: dict) -> None:
        self.home, self.env = home, env
        self.info: dict = {}
        self.client: BenchDaemon | None = None

    def up(self) -> float:
        """Start it (on the same ports after the first time); seconds until it serves."""
        ports = ("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0")
        if self.info:
            ports = (self.info["listen"], self.info["listen_pooled"], self.info["api_url"].removeprefix("http://"))
        t = time.perf_counter()
        proc = subprocess.run(
            [*PGFLEET, "up", "--detach", "--home", str(self.home), "--driver", "sandbox", "--listen", ports[0],
             "--listen-pooled", ports[1], "--api", ports[2], "--timeout", "900"],
            env=self.env, capture_output=True, text=True, timeout=1000)
        took = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"pgfleet up failed: {proc.stderr.strip()}")
        self.info = json.loads((self.home / "daemon.json").read_text())
        token = (self.home / "token").read_text().strip()
        http = httpx.Client(base_url=self.info["api_url"], headers={"Authorization": f"Bearer {token}"}, timeout=600)
        self.client = BenchDaemon(self.home, self.info, http)
        return took

    def api(self, method: str, path: str, body=None) -> dict:
        assert self.client is not None
        return self.client.api(method, path, body)

    @property
    def pid(self) -> int:
        return int(self.info["pid"])

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def down(self) -> None:
        subprocess.run([*PGFLEET, "down", "--home", str(self.home), "--timeout", "900"], env=self.env,
                       capture_output=True, timeout=1000)


def pss_of_processes_under(home: Path) -> tuple[int, float]:
    """(processes, total PSS MiB) of every process whose working directory is below home."""
    root = os.path.realpath(home) + "/"
    n, pss_kib = 0, 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if not os.readlink(f"/proc/{entry.name}/cwd").startswith(root):
                continue
            for line in Path(f"/proc/{entry.name}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss_kib += int(line.split()[1])
            n += 1
        except OSError:
            continue
    return n, pss_kib / 1024


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True)
    return int(out.stdout.split()[0]) if out.returncode == 0 else -1


def mounts_under(home: Path) -> list[str]:
    root = os.path.realpath(home) + "/"
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(root)]


def create_all(d: Daemon, n: int, serial: int, concurrency: int) -> dict:
    body = lambda i: {"name": f"db{i:05d}", "autostart": False,  # noqa: E731
                      "scale_to_zero": {"policy": "on", "cooldown_ms": 3_600_000}}
    passwords: dict[str, str] = {}

    def one(i: int) -> float:
        t = time.perf_counter()
        made = d.api("POST", "/v1/databases", body(i))
        passwords[made["name"]] = made["password"]
        return (time.perf_counter() - t) * 1000

    serial_ms = [one(i) for i in range(min(serial, n))]
    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        concurrent_ms = list(pool.map(one, range(len(serial_ms), n)))
    wall = time.perf_counter() - t
    rest = len(concurrent_ms)
    return {"serial_ms": serial_ms, "concurrent_ms": concurrent_ms, "concurrent_wall_s": wall,
            "creates_per_s": rest / wall if wall else float("nan"), "passwords": passwords,
            "total_s": sum(serial_ms) / 1000 + wall}


async def storm(d: Daemon, names: list[str], passwords: dict[str, str]) -> tuple[list[float], int, list]:
    host, port = d.info["listen"].rsplit(":", 1)
    latencies: list[float] = []
    errors: list[str] = []
    conns: list = []

    async def client(name: str) -> None:
        t = time.perf_counter()
        try:
            conn = await psycopg.AsyncConnection.connect(
                host=host, port=int(port), dbname=name, user=name, password=passwords[name], connect_timeout=600,
                autocommit=True)
            await (await conn.execute("SELECT 1")).fetchone()
            latencies.append((time.perf_counter() - t) * 1000)
            conns.append(conn)
        except Exception as exc:  # counted: the target is that none fail
            errors.append(f"{name}: {exc}")

    await asyncio.gather(*(client(n) for n in names))
    return latencies, errors, conns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--databases", type=int, default=10_000)
    ap.add_argument("--serial", type=int, default=100, help="created one at a time first")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--storm", type=int, default=1000, help="standby databases woken at once")
    ap.add_argument("--restart-running", type=int, default=500, help="awake at the kill -9 restart")
    args = ap.parse_args()
    args.storm = min(args.storm, args.databases)
    args.restart_running = min(args.restart_running, args.databases)

    import tempfile

    base = Path(tempfile.mkdtemp(prefix="pgfleet-density-", dir="/var/tmp"))
    os.chmod(base, 0o711)
    home = base / "home"
    env = dict(os.environ, PGFLEET_HOME=str(home), PGFLEET_QUOTA_INSTANCES=str(args.databases + 10),
               PGFLEET_QUOTA_LIVE_INSTANCES=str(max(args.storm, args.restart_running) + 10),
               PGFLEET_QUOTA_LIVE_MEMORY_MB=str(10**7),
               # the storm's clients all come from 127.0.0.1: one source address, as behind a
               # load balancer; the default cap of 256 authenticating per source would refuse
               # the rest (docs/security.md)
               PGFLEET_LIMIT_MAX_PENDING_PER_SOURCE=str(args.storm + 64))
    d = Daemon(home, env)
    result: dict = {"benchmark": "density", "driver": "sandbox", "machine": machine(), "args": vars(args)}
    try:
        d.up()
        rss_empty = d.rss_mib()
        print(f"creating {args.databases} databases ...", file=sys.stderr)
        made = create_all(d, args.databases, args.serial, args.concurrency)
        passwords = made.pop("passwords")
        names = sorted(passwords)
        fresh_du = du_bytes(home / "instances")
        result["create"] = {
            "serial": summarise(made["serial_ms"]), "concurrent": summarise(made["concurrent_ms"]),
            "creates_per_s_concurrent": round(made["creates_per_s"], 1), "total_s": round(made["total_s"], 1),
            "extrapolated_10000_s": round(10_000 / max(made["creates_per_s"], 1e-9), 1),
        }
        result["disk"] = {"fresh_bytes_per_database": fresh_du / args.databases}

        t = time.perf_counter()
        listed = d.api("GET", "/v1/databases")["databases"]
        list_all_s = time.perf_counter() - t
        t = time.perf_counter()
        d.api("GET", "/v1/databases?limit=100&state=standby")
        result["list"] = {"all_s": round(list_all_s, 3), "count": len(listed),
                          "page_100_ms": round((time.perf_counter() - t) * 1000, 1)}
        result["rss_mib"] = {"empty": round(rss_empty, 1), "defined": round(d.rss_mib(), 1)}
        del listed

        print(f"storm of {args.storm} cold wakes ...", file=sys.stderr)
        before_n, before_pss = pss_of_processes_under(home)
        storm_names = names[: args.storm]
        loop = asyncio.new_event_loop()
        t = time.perf_counter()
        lat, errors, conns = loop.run_until_complete(storm(d, storm_names, passwords))
        storm_wall = time.perf_counter() - t
        procs, pss = pss_of_processes_under(home)
        result["storm"] = {"k": args.storm, "served": len(lat), "errors": len(errors),
                           "first_errors": errors[:10], "wall_s": round(storm_wall, 1),
                           "latency_ms": summarise(lat)}
        result["awake"] = {"databases": len(lat), "processes": procs - before_n,
                           "pss_mib_total": round(pss - before_pss, 1),
                           "pss_mib_per_database": round((pss - before_pss) / max(len(lat), 1), 2),
                           "extrapolated_1000_gib": round((pss - before_pss) / max(len(lat), 1) * 1000 / 1024, 2),
                           "daemon_rss_mib": round(d.rss_mib(), 1)}
        used = d.api("GET", f"/v1/databases/{storm_names[0]}")["disk_bytes"]
        result["disk"]["after_first_start_bytes"] = used
        for c in conns:
            loop.run_until_complete(c.close())
        loop.close()

        print("restarts ...", file=sys.stderr)
        d.down()  # suspends the awake ones
        clean_up_s = d.up()
        t = time.perf_counter()
        with psycopg.connect(host=d.info["listen"].rsplit(":", 1)[0], port=int(d.info["listen"].rsplit(":", 1)[1]),
                             dbname=names[-1], user=names[-1], password=passwords[names[-1]],
                             connect_timeout=120) as c:
            c.execute("SELECT 1").fetchone()
        result["restart"] = {"clean_up_s": round(clean_up_s, 2),
                             "first_wake_after_ms": round((time.perf_counter() - t) * 1000, 1)}
        running = names[: args.restart_running]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: d.api("PUT", f"/v1/databases/{n}/resume"), running))
        os.kill(d.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{d.pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        (home / "daemon.json").unlink(missing_ok=True)
        crash_up_s = d.up()
        states = d.api("GET", "/v1/status")["states"]
        result["restart"].update({"after_kill9_s": round(crash_up_s, 2), "running_at_kill": len(running),
                                  "running_after": states.get("running", 0),
                                  "rss_mib_after": round(d.rss_mib(), 1)})
    finally:
        if d.info:
            d.down()
        left = mounts_under(base)
        for m in left:
            subprocess.run(["umount", "-l", m], capture_output=True)
        result["left_behind_mounts"] = len(left)
        shutil.rmtree(base, ignore_errors=True)

    measured = {
        "disk_per_fresh_database_mb": result["disk"]["fresh_bytes_per_database"] / 1e6,
        "create_p50_ms_serial": result["create"]["serial"]["p50"],
        "creates_per_s_8_concurrent": result["create"]["creates_per_s_concurrent"],
        "list_all_s": result["list"]["all_s"],
        "daemon_rss_mib_defined": result["rss_mib"]["defined"],
        "daemon_rss_mib_awake": result["awake"]["daemon_rss_mib"],
        "restart_serving_s": result["restart"]["after_kill9_s"],
        "storm_served_fraction": result["storm"]["served"] / max(result["storm"]["k"], 1),
    }
    result["targets"] = {}
    for k, (op, target) in TARGETS.items():
        m = measured[k]
        met = m <= target if op == "<=" else m >= target
        result["targets"][k] = {"measured": round(m, 3), "target": f"{op} {target}", "met": met}
    path = write_results("density", result)
    plot(result, made, lat, Path(str(path).replace(".json", ".png")))
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine",)}, indent=1)[:6000])
    print(f"wrote {path}")


def plot(result: dict, made: dict, storm_ms: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4.5))
    a.boxplot([made["serial_ms"], made["concurrent_ms"]], tick_labels=["one at a time", "8 concurrent"],
              showfliers=True)
    a.axhline(50, color="tab:red", linestyle=":", linewidth=1, label="p50 target (serial)")
    a.set_ylabel("create latency (ms)")
    a.set_title(f"create ({result['create']['creates_per_s_concurrent']}/s with 8 clients)")
    a.legend(fontsize=8)
    s = sorted(storm_ms)
    b.plot(s, [i / max(len(s), 1) for i in range(1, len(s) + 1)])
    b.set_xlabel("connect to first result (ms)")
    b.set_ylabel("fraction of clients")
    b.set_title(f"storm: {result['storm']['served']}/{result['storm']['k']} cold wakes served")
    names = list(result["targets"])
    ratios = []
    for k in names:
        t = result["targets"][k]
        target = float(t["target"].split()[1])
        ratios.append(t["measured"] / target if t["target"].startswith("<=") else target / max(t["measured"], 1e-9))
    c.barh(names, ratios, color=["tab:green" if result["targets"][k]["met"] else "tab:red" for k in names])
    c.axvline(1.0, color="black", linewidth=1)
    c.set_xlabel("measured / target (<= 1 is met)")
    c.set_title(f"N = {result['args']['databases']} databases")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
