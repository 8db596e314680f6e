"""Branches and archiving, measured (issue 14):

- branch of now against the parent's size (running and standby parent), with the longest
  stall a client of the parent sees while the branch is made (target: branch <= 1 s,
  parent's clients blocked <= ~100 ms);
- restore (branch --at) time against the WAL volume replayed;
- the cost of archiving in TPC-B throughput: two clusters from one initdb, pgbench
  TPC-B-like on each in interleaved rounds, one with pgfleet's archive settings
  (wal_level=replica, basic_archive) and one without (wal_level=minimal).

The daemon's databases live on a copy-on-write store of their own (`pgfleet up --cow-image`:
a sparse XFS image with reflinks, removed after the run; `--cow-image ""` runs on the home's
own file system); the results say which. Parents of 10 MB and 1 GB by default. The first
branch right after the parent was filled is recorded on its own (`after_fill`): it also
writes back what the fill left in the page cache (the backup's checkpoint and the clones
need the parent's data on disk), a cost of the recent writes, not of the parent's size.
Writes bench/results/branches.json and branches.png.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, start_daemon, summarise, write_results  # noqa: E402

TARGETS = {"branch_now_s": 1.0, "parent_stall_ms": 100.0}
ROW_BYTES = 140  # a row of the fill table on disk, roughly


def fill(conninfo: dict, mb: int) -> int:
    rows = mb * (1 << 20) // ROW_BYTES
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS fill(g int, pad text)")
        conn.execute("INSERT INTO fill SELECT g, repeat('x', 100) FROM generate_series(1, %s) g", (rows,))
        return conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]


class Prober(threading.Thread):
    """A client of the parent running SELECT 1 in a loop: its longest query is the stall."""

    def __init__(self, conninfo: dict) -> None:
        super().__init__(daemon=True)
        self.conninfo, self.stop, self.worst_ms, self.queries, self.errors = conninfo, threading.Event(), 0.0, 0, 0

    def run(self) -> None:
        with psycopg.connect(**self.conninfo, autocommit=True) as conn:
            while not self.stop.is_set():
                t = time.perf_counter()
                try:
                    conn.execute("SELECT 1").fetchone()
                    self.queries += 1
                except psycopg.Error:
                    self.errors += 1
                self.worst_ms = max(self.worst_ms, (time.perf_counter() - t) * 1000)
                time.sleep(0.002)


def branch_right_after_fill(d, parent: str, conninfo: dict, tag: str) -> dict:
    prober = Prober(conninfo)
    prober.start()
    time.sleep(0.2)
    t = time.perf_counter()
    d.api("POST", f"/v1/databases/{parent}/branches", {"name": f"{tag}-fill"})
    seconds = time.perf_counter() - t
    prober.stop.set()
    prober.join()
    d.api("DELETE", f"/v1/databases/{tag}-fill")
    return {"running_s": seconds, "stall_ms": prober.worst_ms}


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def branch_times(d, parent: str, conninfo: dict, reps: int, tag: str) -> dict:
    """`store_growth_bytes`: how much the databases' file system grew per branch of the running
    parent (a few MB of WAL and catalog with reflinks; the parent's size with copies)."""
    out = {"running_s": [], "standby_s": [], "stall_ms": [], "idle_stall_ms": [], "store_growth_bytes": []}
    store = d.home / "instances"
    for i in range(reps):
        d.api("PUT", f"/v1/databases/{parent}/resume")
        prober = Prober(conninfo)
        prober.start()
        time.sleep(0.2)
        before = used_bytes(store)
        t = time.perf_counter()
        d.api("POST", f"/v1/databases/{parent}/branches", {"name": f"{tag}-r{i}"})
        seconds = time.perf_counter() - t
        out["store_growth_bytes"].append(used_bytes(store) - before)
        out["running_s"].append(seconds)
        prober.stop.set()
        prober.join()
        out["stall_ms"].append(prober.worst_ms)
        # the control: the same client for as long, no branch made (the machine's own noise)
        control = Prober(conninfo)
        control.start()
        time.sleep(seconds + 0.2)
        control.stop.set()
        control.join()
        out["idle_stall_ms"].append(control.worst_ms)
        d.api("DELETE", f"/v1/databases/{tag}-r{i}")
        d.api("PUT", f"/v1/databases/{parent}/suspend")
        t = time.perf_counter()
        d.api("POST", f"/v1/databases/{parent}/branches", {"name": f"{tag}-s{i}"})
        out["standby_s"].append(time.perf_counter() - t)
        d.api("DELETE", f"/v1/databases/{tag}-s{i}")
    return out


def restore_times(d, host: str, port: int, wal_mbs: list[int]) -> list[dict]:
    results = []
    for wal_mb in wal_mbs:
        name = f"wal{wal_mb}"
        created = d.api("POST", "/v1/databases", {"name": name})
        conninfo = dict(host=host, port=port, dbname=name, user=name, password=created["password"], connect_timeout=120)
        d.api("POST", f"/v1/databases/{name}/backups")
        with psycopg.connect(**conninfo, autocommit=True) as conn:
            start = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            conn.execute("CREATE TABLE w(g int, pad text)")
            conn.execute("INSERT INTO w SELECT g, repeat('y', 100) FROM generate_series(1, %s) g",
                         (wal_mb * (1 << 20) // 200,))  # ~200 bytes of WAL per row
            end = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            wal_bytes = conn.execute("SELECT pg_wal_lsn_diff(%s, %s)", (end, start)).fetchone()[0]
        at = datetime.now(timezone.utc).isoformat()
        t = time.perf_counter()
        d.api("POST", f"/v1/databases/{name}/branches", {"name": f"{name}-at", "at": at})
        seconds = time.perf_counter() - t
        results.append({"wal_mb": round(float(wal_bytes) / (1 << 20), 1), "restore_s": round(seconds, 3)})
        for db in (f"{name}-at", name):
            d.api("DELETE", f"/v1/databases/{db}")
    return results


def archiving_cost(rounds: int, seconds: int) -> dict:
    """TPC-B tps with and without pgfleet's archive settings, interleaved rounds."""
    from pgfleet.drivers.pgbin import find_postgres
    from pgfleet.drivers.sandbox.archive import SPOOL, postgres_args

    pg = find_postgres()
    root = Path(tempfile.mkdtemp(prefix="pgfleet-bench-arch-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    shutil.chown(root, "postgres", "postgres")

    def as_pg(*argv: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True, **kw)

    settings = {"plain": ["-c", "wal_level=minimal", "-c", "max_wal_senders=0", "-c", "archive_mode=off"],
                "archived": postgres_args()}
    tps: dict[str, list[float]] = {k: [] for k in settings}
    try:
        as_pg(str(pg.initdb), "-D", str(root / "plain"), "--no-sync", "--wal-segsize=1", "-U", "postgres",
              "--auth=trust", check=True)
        as_pg("cp", "-a", str(root / "plain"), str(root / "archived"), check=True)
        as_pg("mkdir", str(root / "archived" / SPOOL), check=True)
        for name, extra in settings.items():
            (root / f"{name}.sock").mkdir()
            shutil.chown(root / f"{name}.sock", "postgres", "postgres")
            opts = " ".join(["-c listen_addresses=''", f"-k {root}/{name}.sock", "-c shared_buffers=64MB",
                             *(f"{a} {b}" for a, b in zip(extra[::2], extra[1::2]))])
            as_pg(str(pg.bindir / "pg_ctl"), "-D", str(root / name), "-o", opts, "-w", "-l",
                  str(root / f"{name}.log"), "start", check=True)
            as_pg(str(pg.bindir / "pgbench"), "-i", "-s", "5", "-q", "-h", f"{root}/{name}.sock", "postgres", check=True)
        for _ in range(rounds):
            for name in settings:
                run = as_pg(str(pg.bindir / "pgbench"), "-c", "4", "-j", "2", "-T", str(seconds), "-n",
                            "-h", f"{root}/{name}.sock", "postgres")
                m = re.search(r"tps = ([0-9.]+)", run.stdout)
                if m:
                    tps[name].append(float(m.group(1)))
                # the archive spool is the host's to empty; here nobody does, so clear it
                if name == "archived":
                    for f in (root / "archived" / SPOOL).iterdir():
                        f.unlink(missing_ok=True)  # basic_archive renames its temporary files meanwhile
    finally:
        for name in settings:
            as_pg(str(pg.bindir / "pg_ctl"), "-D", str(root / name), "-m", "fast", "stop")
        shutil.rmtree(root, ignore_errors=True)
    mean = {k: sum(v) / len(v) if v else float("nan") for k, v in tps.items()}
    return {"tps": tps, "mean_tps": mean, "archived_over_plain": round(mean["archived"] / mean["plain"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="10,1024")
    ap.add_argument("--cow-image", default="8G", help="size of the daemon's copy-on-write store; '' for none")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--wal-mb", default="8,32,64")
    ap.add_argument("--tpcb-rounds", type=int, default=3)
    ap.add_argument("--tpcb-seconds", type=int, default=10)
    args = ap.parse_args()

    sizes = [int(s) for s in args.sizes_mb.split(",")]
    d = start_daemon("sandbox", ("--cow-image", args.cow_image) if args.cow_image else ())
    host, port = d.proxy
    branch: dict[str, dict] = {}
    storage = d.api("GET", "/v1/status")["branch_storage"]
    print(f"branches: {storage['mode']} in {storage['path']}")
    try:
        for mb in sizes:
            name = f"p{mb}"
            created = d.api("POST", "/v1/databases", {"name": name})
            conninfo = dict(host=host, port=port, dbname=name, user=name, password=created["password"],
                            connect_timeout=120)
            size = fill(conninfo, mb)
            after_fill = branch_right_after_fill(d, name, conninfo, name)
            times = branch_times(d, name, conninfo, args.reps, name)
            branch[str(mb)] = {"parent_bytes": size, "after_fill": after_fill, **times,
                               "running": summarise([s * 1000 for s in times["running_s"]]),
                               "standby": summarise([s * 1000 for s in times["standby_s"]]),
                               "stall": summarise(times["stall_ms"]),
                               "idle_stall": summarise(times["idle_stall_ms"])}
            d.api("DELETE", f"/v1/databases/{name}")
            print(f"{mb} MB parent ({size / 1e6:.0f} MB): branch running p50 {branch[str(mb)]['running']['p50']:.0f} ms, "
                  f"standby p50 {branch[str(mb)]['standby']['p50']:.0f} ms, parent stall max {max(times['stall_ms']):.0f} ms "
                  f"(same client without a branch: {max(times['idle_stall_ms']):.0f} ms); right after the fill: "
                  f"{after_fill['running_s'] * 1000:.0f} ms, stall {after_fill['stall_ms']:.0f} ms; the store grew "
                  f"{max(times['store_growth_bytes']) / 1e6:.1f} MB per branch")
        restores = restore_times(d, host, port, [int(x) for x in args.wal_mb.split(",")])
        for r in restores:
            print(f"restore with {r['wal_mb']} MB of WAL: {r['restore_s']:.2f} s")
    finally:
        d.stop()
        from pgfleet.drivers import cowstore

        if cowstore.unmount(d.home):
            shutil.rmtree(d.home, ignore_errors=True)  # the store's image with it
    cost = archiving_cost(args.tpcb_rounds, args.tpcb_seconds)
    print(f"TPC-B tps archived/plain: {cost['archived_over_plain']} ({cost['mean_tps']})")

    worst_branch = max(max(v["running_s"] + v["standby_s"]) for v in branch.values())
    worst_stall = max(max(v["stall_ms"]) for v in branch.values())
    result = {
        "benchmark": "branches", "machine": machine(), "load_average": os.getloadavg(), "args": vars(args),
        "storage": storage, "branch_of_now": branch, "restore": restores, "archiving_tpcb": cost,
        "targets": {
            "branch_now_s": {"measured": round(worst_branch, 3), "target": TARGETS["branch_now_s"],
                             "met": worst_branch <= TARGETS["branch_now_s"]},
            "parent_stall_ms": {"measured": round(worst_stall, 1), "target": TARGETS["parent_stall_ms"],
                                "met": worst_stall <= TARGETS["parent_stall_ms"]},
            # not counted above: the first branch after a bulk write also writes that back
            "right_after_fill_s": {str(mb): round(v["after_fill"]["running_s"], 3) for mb, v in branch.items()},
        },
    }
    path = write_results("branches", result)
    plot(result, Path(str(path).replace(".json", ".png")))
    for k, v in result["targets"].items():
        if "target" in v:
            print(f"target {k}: {v['measured']} <= {v['target']}: {'met' if v['met'] else 'NOT MET'}")
    print(f"wrote {path}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 4))
    sizes = sorted(result["branch_of_now"], key=int)
    mbs = [result["branch_of_now"][s]["parent_bytes"] / 1e6 for s in sizes]
    for kind, marker in (("running", "o"), ("standby", "s")):
        a.plot(mbs, [result["branch_of_now"][s][kind]["p50"] / 1000 for s in sizes], marker=marker, label=f"parent {kind}")
    a.plot(mbs, [result["branch_of_now"][s]["after_fill"]["running_s"] for s in sizes], marker="x", linestyle=":",
           label="right after the fill")
    a.axhline(TARGETS["branch_now_s"], color="tab:red", linestyle="--", linewidth=1, label="target")
    a.set_xlabel("parent size (MB)")
    a.set_ylabel("branch of now, p50 (s)")
    a.set_xscale("log")
    a.legend(fontsize=8)
    a.set_title(f"branch of now vs parent size ({result['storage']['mode']})")
    b.plot([r["wal_mb"] for r in result["restore"]], [r["restore_s"] for r in result["restore"]], marker="o")
    b.set(xlabel="WAL replayed (MB)", ylabel="branch --at (s)", title="point-in-time restore vs WAL volume")
    cost = result["archiving_tpcb"]["mean_tps"]
    c.bar(list(cost), list(cost.values()), color=["tab:gray", "tab:blue"])
    c.set(ylabel="TPC-B tps (pgbench -c 4)", title=f"archiving cost: {result['archiving_tpcb']['archived_over_plain']}x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
