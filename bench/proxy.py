"""Benchmark: the pgfleet proxy side by side with Postgres itself and with PgBouncer.

    .venv/bin/python bench/proxy.py [--duration 15] [--rounds 3] [--scale 10] [--quick]

One throwaway daemon (sandbox driver), one database, pgbench's tables made once through the
pgfleet direct listener as the database's role (so every path below reaches the same tables
as the same role). Five ways to the SAME database, each measured with pgbench (`-j 2`):

  postgres        : straight to the database's backend (its unix socket, trust, no proxy)
  pgfleet-direct  : the pgfleet direct listener (one server session per client; SCRAM)
  pgfleet-pooled  : the pgfleet pooled listener (transaction pooling; SCRAM)
  pgbouncer       : PgBouncer (Debian package), started by this script with a generated ini:
                    127.0.0.1 on a free port, pool_mode = transaction, default_pool_size = 20
                    (the same as the pgfleet pool), max_client_conn = 500. Clients authenticate
                    with SCRAM-SHA-256 against an auth_file holding a SCRAM verifier of the role's
                    password (as pgfleet stores it); PgBouncer reaches the backend's unix socket, where Postgres
                    trusts local connections, running as the backend socket's owner uid.
                    It is restarted for each of its runs, so its idle server connections never
                    count against the backend's max_connections during the other runs.
  pgbouncer-session: the same PgBouncer in session mode: a relay written in C, the reference
                    for what any userspace relay (pgfleet direct) costs on this machine.

Workloads: select-only (-S) and TPC-B-like at -c 16 and -c 64, and select-only with
`-M prepared` at -c 16 (PgBouncer 1.18 in transaction mode is expected to fail that one: its
failure is recorded as measured). Rounds are interleaved: every round runs every workload on
every config, the config order rotating from round to round; medians over rounds.

Also per run: the proxy's own CPU time (utime + stime of the pgfleet daemon process, or of
PgBouncer, from /proc/<pid>/stat before and after) per transaction, split into user time
(the proxy's own code) and kernel time (its socket syscalls, wakeups, context switches). And connection setup:
`pgbench -C` with a `SELECT 1` script (one client: new connection + SELECT 1 each time, and
the proxy's CPU per connection), plus a psycopg loop of new connection + SELECT 1 (latency).

How noisy a run was: per run, the CPU time the machine spent on anything else (its busy time
from /proc/stat minus pgbench, the daemon, the database's processes and PgBouncer), and the
spread of each config's TPS over rounds.

Writes bench/results/proxy.json and bench/results/proxy.png. The targets are reported, not
asserted: pooled TPS >= 1.0x PgBouncer, pgfleet direct >= 0.9x Postgres, proxy CPU per
transaction below PgBouncer's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RESULTS, machine, start_daemon, summarise, write_results  # noqa: E402
from pgfleet.pgwire.scram import Verifier  # noqa: E402

CONFIGS = ("postgres", "pgfleet-direct", "pgfleet-pooled", "pgbouncer", "pgbouncer-session")
PROXIES = ("pgfleet-direct", "pgfleet-pooled", "pgbouncer", "pgbouncer-session")
BOUNCERS = {"pgbouncer": "transaction", "pgbouncer-session": "session"}
POOL_SIZE = 20
DBNAME = "benchproxy"
TARGETS = {"pooled_over_pgbouncer_tps": 1.0, "direct_over_postgres_tps": 0.9, "cpu_per_tx_over_pgbouncer": 1.0}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def workloads(clients: list[int]) -> list[dict]:
    out = []
    for script, args in (("select-only", ["-S"]), ("tpcb-like", ["-b", "tpcb-like"])):
        for c in clients:
            out.append({"id": f"{script}/c{c}", "script": script, "clients": c, "args": args, "mode": "simple"})
    out.append({"id": f"select-only-prepared/c{min(clients)}", "script": "select-only", "clients": min(clients),
                "args": ["-S", "-M", "prepared"], "mode": "prepared"})
    return out


def cpu_split(pid: int | None) -> tuple[float, float] | None:
    """(utime, stime) of one process (all its threads), in seconds."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of one process (all its threads), in seconds."""
    split = cpu_split(pid)
    return None if split is None else split[0] + split[1]


def uid_cpu_seconds(uid: int) -> float:
    """CPU time of every process of one uid (the database's postgres processes and our PgBouncer),
    including children they reaped (backends that came and went during a run)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2:].split()
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy (all CPUs), from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


class CpuWitness:
    """How much of the machine's CPU went to work that is not this benchmark's during a run:
    busy time of the whole machine minus pgbench (our children), the pgfleet daemon, and the
    database's processes and PgBouncer (one uid)."""

    def __init__(self, daemon_pid: int, uid: int) -> None:
        self.daemon_pid, self.uid = daemon_pid, uid

    def sample(self) -> tuple[float, float, float]:
        import resource

        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours = ru.ru_utime + ru.ru_stime + (cpu_seconds(self.daemon_pid) or 0) + uid_cpu_seconds(self.uid)
        return time.monotonic(), machine_busy_seconds(), ours

    @staticmethod
    def report(before: tuple, after: tuple) -> dict:
        wall = after[0] - before[0]
        cpus = os.cpu_count() or 1
        busy, ours = after[1] - before[1], after[2] - before[2]
        return {"machine_busy_pct": round(100 * busy / (wall * cpus), 1),
                "other_work_pct": round(min(100.0, max(0.0, 100 * (busy - ours) / (wall * cpus))), 1)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def tool_version(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.splitlines()[0].strip()
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({exc})"


class PgBouncer:
    """A PgBouncer of this benchmark in front of the backend's socket (transaction or session mode)."""

    def __init__(self, sockdir: str, backend_db: str, name: str, role: str, password: str,
                 mode: str = "transaction") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"pgfleet-bench-pgbouncer-{mode}-"))
        st = os.stat(sockdir)
        self.uid, self.gid = st.st_uid, st.st_gid  # the only uid that may enter the socket's directory
        self.port = free_port()
        # a SCRAM verifier, as pgfleet stores: a plain-text password would make PgBouncer derive
        # the salted password (4096 PBKDF2 rounds) on every login
        verifier = Verifier.from_password(password).encode()
        (self.dir / "userlist.txt").write_text(f'"{role}" "{verifier}"\n')
        (self.dir / "pgbouncer.ini").write_text(f"""\
[databases]
{name} = host={sockdir} port=5432 dbname={backend_db} user={role}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {self.dir}/userlist.txt
pool_mode = {mode}
default_pool_size = {POOL_SIZE if mode == "transaction" else 90}
max_client_conn = 500
ignore_startup_parameters = extra_float_digits,options
logfile = {self.dir}/pgbouncer.log
pidfile = {self.dir}/pgbouncer.pid
log_connections = 0
log_disconnections = 0
""")
        for p in [self.dir, *self.dir.iterdir()]:
            os.chown(p, self.uid, self.gid)
        os.chmod(self.dir, 0o700)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.port = free_port()
        ini = self.dir / "pgbouncer.ini"
        ini.write_text(re.sub(r"listen_port = \d+", f"listen_port = {self.port}", ini.read_text()))
        cmd = ["pgbouncer", str(ini)]
        if os.geteuid() == 0:  # PgBouncer refuses to run as root
            cmd = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--", *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited: {self.proc.stderr.read().decode()} {self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"pgbouncer did not listen on {self.port}: {self.log_tail()}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_tail(self) -> str:
        try:
            return "\n".join((self.dir / "pgbouncer.log").read_text().splitlines()[-5:])
        except OSError:
            return ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def parse_pgbench(out: str) -> dict:
    def num(pattern: str) -> float | None:
        mt = re.search(pattern, out)
        return float(mt.group(1)) if mt else None

    errors = [ln.strip() for ln in out.splitlines()
              if re.search(r"aborted|error|FATAL|could not", ln, re.I) and "number of failed" not in ln]
    return {
        "tps": num(r"tps = ([\d.]+) \((?:without initial connection time|including reconnection times)\)"),
        "transactions": num(r"number of transactions actually processed: (\d+)"),
        "failed": num(r"number of failed transactions: (\d+)"),
        "latency_ms": num(r"latency average = ([\d.]+) ms"),
        "connection_ms": num(r"(?:initial|average) connection time = ([\d.]+) ms"),
        "errors": errors[:5],
    }


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.d = start_daemon("sandbox")
        try:
            self._setup(args)
        except BaseException:
            self.d.stop()
            raise

    def _setup(self, args) -> None:
        self.daemon_pid = int(self.d.info["pid"])
        body = {"name": DBNAME, "memory_mb": args.memory_mb, "scale_to_zero": {"policy": "off"},
                "pooling": {"pool_size": POOL_SIZE, "max_direct_clients": 90, "max_pooled_clients": 1000}}
        try:
            created = self.d.api("POST", "/v1/databases", body)
        except RuntimeError as exc:  # an API without per-database pooling settings: its defaults
            print(f"note: create with pooling settings refused ({exc}); using the defaults", file=sys.stderr)
            body.pop("pooling")
            created = self.d.api("POST", "/v1/databases", body)
        self.password = created["password"]
        self.db = self.d.api("GET", f"/v1/databases/{DBNAME}")
        self.sockdir = self.db["backend"].removeprefix("unix:")
        self.role = self.db["role"]
        self.backend_db = self._backend_database()
        host, port = self.d.proxy
        pooled_host, pooled_port = self.d.info["listen_pooled"].rsplit(":", 1)
        self.bouncers = {config: PgBouncer(self.sockdir, self.backend_db, DBNAME, self.role, self.password, mode)
                         for config, mode in BOUNCERS.items()}
        self.witness = CpuWitness(self.daemon_pid, self.bouncers["pgbouncer"].uid)
        tcp = dict(PGUSER=self.role, PGDATABASE=DBNAME, PGPASSWORD=self.password, PGSSLMODE="disable")
        self.env = {
            "postgres": dict(PGHOST=self.sockdir, PGPORT="5432", PGUSER=self.role, PGDATABASE=self.backend_db),
            "admin": dict(PGHOST=self.sockdir, PGPORT="5432", PGUSER=self.db.get("backend_user", "postgres"),
                          PGDATABASE=self.backend_db),
            "pgfleet-direct": dict(PGHOST=host, PGPORT=str(port), **tcp),
            "pgfleet-pooled": dict(PGHOST=pooled_host, PGPORT=pooled_port, **tcp),
            "pgbouncer": dict(PGHOST="127.0.0.1", PGPORT="0", **tcp),  # port set when it starts
            "pgbouncer-session": dict(PGHOST="127.0.0.1", PGPORT="0", **tcp),
        }
        self.select1 = Path(self.bouncers["pgbouncer"].dir.parent / f"pgfleet-bench-select1-{os.getpid()}.sql")
        self.select1.write_text("SELECT 1;\n")

    def _backend_database(self) -> str:
        """The database inside the instance: named after the database (issue 15), or the
        cluster's 'postgres' on daemons from before it (a before/after run of an old commit)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGHOST=self.sockdir, PGPORT="5432", PGUSER=self.role)
        for name in (DBNAME, "postgres"):
            p = subprocess.run(["psql", "-X", "-At", "-c", "SELECT 1"], env={**env, "PGDATABASE": name},
                               capture_output=True, text=True, timeout=60)
            if p.returncode == 0:
                return name
        raise SystemExit(f"no database to reach over the backend's socket: {p.stderr.strip()}")

    def close(self) -> None:
        for bouncer in self.bouncers.values():
            bouncer.cleanup()
        self.select1.unlink(missing_ok=True)
        self.d.stop()
        shutil.rmtree(self.d.home, ignore_errors=True)  # a throwaway daemon: its databases go with it

    # --- plumbing -------------------------------------------------------------------------

    def environ(self, config: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(self.env[config], PGCONNECT_TIMEOUT="30", PGAPPNAME="bench-proxy")
        if config in self.bouncers:
            env["PGPORT"] = str(self.bouncers[config].port)
        return env

    def proxy_pid(self, config: str) -> int | None:
        if config in self.bouncers:
            return self.bouncers[config].pid
        return None if config == "postgres" else self.daemon_pid

    def psql(self, config: str, sql: str) -> str:
        p = subprocess.run(["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql], env=self.environ(config),
                           capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"psql via {config}: {p.stderr.strip()}")
        return p.stdout.strip()

    def pgbench(self, config: str, args: list[str], timeout: float) -> dict:
        bouncer = self.bouncers.get(config)
        started_bouncer = False
        if bouncer is not None and bouncer.pid is None:
            bouncer.start()
            started_bouncer = True
        try:
            pid = self.proxy_pid(config)
            w0 = self.witness.sample()
            cpu0, t0 = cpu_split(pid), time.monotonic()
            p = subprocess.run(["pgbench", *args], env=self.environ(config),
                               capture_output=True, text=True, timeout=timeout)
            wall = time.monotonic() - t0
            time.sleep(0.3)  # backends and proxy sessions wind down and are reaped: their CPU time counts
            cpu1 = cpu_split(pid)
            noise = CpuWitness.report(w0, self.witness.sample())
        finally:
            if started_bouncer:
                bouncer.stop()
        res = parse_pgbench(p.stdout + "\n" + p.stderr)
        res["rc"] = p.returncode
        res["ok"] = p.returncode == 0 and res["tps"] is not None and not res["failed"]
        res["wall_s"] = round(wall, 2)
        res.update(noise)
        if cpu0 is not None and cpu1 is not None:
            user, kernel = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
            res["proxy_cpu_s"] = round(user + kernel, 3)
            res["proxy_cpu_pct_of_one_core"] = round(100 * (user + kernel) / wall, 1)
            tx = res["transactions"]
            res["proxy_cpu_us_per_tx"] = round(1e6 * (user + kernel) / tx, 2) if tx else None
            res["proxy_user_us_per_tx"] = round(1e6 * user / tx, 2) if tx else None
            res["proxy_kernel_us_per_tx"] = round(1e6 * kernel / tx, 2) if tx else None
        if not res["ok"] and not res["errors"]:
            res["errors"] = (p.stderr.strip().splitlines() or ["(no output)"])[-3:]
        return res

    def connect_loop(self, config: str, n: int) -> list[float]:
        """psycopg: new connection + SELECT 1, n times (ms each), in a child process (as
        pgbench is: its CPU time counts as the client's, not as this process's)."""
        env = self.env[config]
        kw = dict(host=env["PGHOST"], port=self.bouncers[config].port if config in self.bouncers else int(env["PGPORT"]),
                  user=env["PGUSER"], dbname=env["PGDATABASE"], password=env.get("PGPASSWORD"),
                  connect_timeout=30)
        if config != "postgres":
            kw["sslmode"] = "disable"
        p = subprocess.run([sys.executable, __file__, "--connect-loop", json.dumps(kw), str(n)],
                           capture_output=True, text=True, timeout=600)
        if p.returncode != 0:  # recorded as no samples (the summary says n 0), the run goes on
            print(f"connect loop via {config} failed: {p.stderr.strip()[-300:]}", file=sys.stderr, flush=True)
            return []
        return json.loads(p.stdout)

    # --- the benchmark ------------------------------------------------------------------

    def init_tables(self) -> float:
        t = time.monotonic()
        p = subprocess.run(["pgbench", "-i", "-s", str(self.args.scale), "-q"], env=self.environ("pgfleet-direct"),
                           capture_output=True, text=True, timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"pgbench -i through the pgfleet direct listener failed: {p.stderr.strip()}")
        return time.monotonic() - t

    def reset_tpcb(self, accounts: bool) -> None:
        """Much the same starting point for every TPC-B-like run: no history, few dead tuples,
        no checkpoint pending (as the backend's superuser, over its socket)."""
        self.psql("admin", "TRUNCATE pgbench_history")
        self.psql("admin", "VACUUM pgbench_branches, pgbench_tellers" + (", pgbench_accounts" if accounts else ""))
        self.psql("admin", "CHECKPOINT")

    def run(self) -> dict:
        a = self.args
        wls = workloads(a.clients)
        runs: list[dict] = []
        connects: list[dict] = []
        conn_samples: dict[str, list[float]] = {c: [] for c in CONFIGS}
        total = a.rounds * (len(wls) * len(CONFIGS) + len(CONFIGS))
        done = 0
        for rnd in range(a.rounds):
            order = list(CONFIGS[rnd % len(CONFIGS):] + CONFIGS[:rnd % len(CONFIGS)])
            for wl in wls:
                for i, config in enumerate(order):
                    if wl["script"] == "tpcb-like":
                        self.reset_tpcb(accounts=i == 0)
                    args = ["-n", "-c", str(wl["clients"]), "-j", str(a.jobs), "-T", str(a.duration), *wl["args"]]
                    res = self.pgbench(config, args, timeout=a.duration * 4 + 120)
                    res.update(round=rnd, workload=wl["id"], config=config, load1=loadavg()[0])
                    if config == "pgfleet-pooled":  # evidence of pooling: server connections left open by the pool
                        res["pool_server_connections"] = int(self.psql(
                            "admin", "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                            f" AND usename = '{self.role}'"))
                    runs.append(res)
                    done += 1
                    status = f"{res['tps']:.0f} tps" if res["ok"] else f"FAILED ({'; '.join(res['errors'][:1])})"
                    status += f"  [other work {res['other_work_pct']}% of the machine]"
                    print(f"[{done}/{total}] round {rnd + 1} {wl['id']:<26} {config:<15} {status}"
                          + (f"  proxy {res.get('proxy_cpu_us_per_tx')} us/tx" if res.get("proxy_cpu_us_per_tx")
                             else ""), file=sys.stderr, flush=True)
            # connection setup: new connection + SELECT 1
            for config in order:
                res = self.pgbench(config, ["-n", "-C", "-c", "1", "-j", "1", "-T", str(a.connect_duration),
                                            "-f", str(self.select1)], timeout=a.connect_duration * 4 + 60)
                res.update(round=rnd, config=config)
                if res.get("proxy_cpu_s") is not None and res["transactions"]:
                    res["proxy_cpu_us_per_connection"] = res.pop("proxy_cpu_us_per_tx")
                connects.append(res)
                bouncer = self.bouncers.get(config)
                if bouncer is not None:
                    bouncer.start()
                try:
                    conn_samples[config] += self.connect_loop(config, a.connect_samples)
                finally:
                    if bouncer is not None:
                        bouncer.stop()
                done += 1
                print(f"[{done}/{total}] round {rnd + 1} connect {config:<15} "
                      f"pgbench -C {res['tps'] or 0:.0f} conn/s, psycopg p50 "
                      f"{median_or_none(conn_samples[config])} ms", file=sys.stderr, flush=True)
        return {"workloads": wls, "runs": runs, "connects": connects, "connect_samples_ms": conn_samples}


def connect_loop_child(kw: dict, n: int) -> None:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        with psycopg.connect(**kw) as conn:
            conn.execute("SELECT 1").fetchone()
        samples.append((time.perf_counter() - t) * 1000)
    print(json.dumps(samples))


def median_or_none(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 2) if xs else None


def summarise_runs(wls: list[dict], runs: list[dict], connects: list[dict], samples: dict) -> dict:
    out: dict = {"tps": {}, "connect": {}}
    for wl in wls:
        cell = out["tps"][wl["id"]] = {}
        for config in CONFIGS:
            rs = [r for r in runs if r["workload"] == wl["id"] and r["config"] == config]
            ok = [r for r in rs if r["ok"]]
            tps = [r["tps"] for r in ok]
            cell[config] = {
                "median_tps": median_or_none(tps), "min_tps": min(tps) if tps else None,
                "max_tps": max(tps) if tps else None,
                "cv_pct": round(100 * statistics.pstdev(tps) / statistics.fmean(tps), 1) if len(tps) > 1 else None,
                "runs": len(rs), "ok_runs": len(ok),
                "proxy_cpu_us_per_tx": median_or_none([r.get("proxy_cpu_us_per_tx") for r in ok]),
                "proxy_user_us_per_tx": median_or_none([r.get("proxy_user_us_per_tx") for r in ok]),
                "proxy_kernel_us_per_tx": median_or_none([r.get("proxy_kernel_us_per_tx") for r in ok]),
                "proxy_cpu_pct_of_one_core": median_or_none([r.get("proxy_cpu_pct_of_one_core") for r in ok]),
                "latency_ms": median_or_none([r["latency_ms"] for r in ok]),
                "pool_server_connections": median_or_none([r.get("pool_server_connections") for r in rs]),
                "failures": [{"round": r["round"], "rc": r["rc"], "errors": r["errors"]} for r in rs if not r["ok"]],
            }
    for config in CONFIGS:
        cs = [c for c in connects if c["config"] == config and c["ok"]]
        out["connect"][config] = {
            "pgbench_C_connections_per_s": median_or_none([c["tps"] for c in cs]),
            "pgbench_C_ms_per_connection_and_select1": median_or_none([1000 / c["tps"] for c in cs if c["tps"]]),
            "proxy_cpu_us_per_connection": median_or_none([c.get("proxy_cpu_us_per_connection") for c in cs]),
            "psycopg_connect_select1_ms": summarise(samples[config]),
            "failures": [{"round": c["round"], "errors": c["errors"]} for c in connects
                         if c["config"] == config and not c["ok"]],
        }
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def ratios(summary: dict) -> dict:
    out: dict = {}
    for wid, cell in summary["tps"].items():
        tps = {c: cell[c]["median_tps"] for c in CONFIGS}
        cpu = {c: cell[c]["proxy_cpu_us_per_tx"] for c in PROXIES}
        out[wid] = {
            "pooled_over_pgbouncer_tps": ratio(tps["pgfleet-pooled"], tps["pgbouncer"]),
            "direct_over_postgres_tps": ratio(tps["pgfleet-direct"], tps["postgres"]),
            "direct_over_pgbouncer_session_tps": ratio(tps["pgfleet-direct"], tps["pgbouncer-session"]),
            "pgbouncer_session_over_postgres_tps": ratio(tps["pgbouncer-session"], tps["postgres"]),
            "pooled_over_postgres_tps": ratio(tps["pgfleet-pooled"], tps["postgres"]),
            "pgbouncer_over_postgres_tps": ratio(tps["pgbouncer"], tps["postgres"]),
            "pooled_over_pgbouncer_cpu_per_tx": ratio(cpu["pgfleet-pooled"], cpu["pgbouncer"]),
            "direct_over_pgbouncer_cpu_per_tx": ratio(cpu["pgfleet-direct"], cpu["pgbouncer"]),
            "direct_over_pgbouncer_session_cpu_per_tx": ratio(cpu["pgfleet-direct"], cpu["pgbouncer-session"]),
        }
    con = summary["connect"]
    out["connect"] = {
        "pooled_over_pgbouncer_ms": ratio(con["pgfleet-pooled"]["psycopg_connect_select1_ms"]["p50"],
                                          con["pgbouncer"]["psycopg_connect_select1_ms"]["p50"]),
        "direct_over_postgres_ms": ratio(con["pgfleet-direct"]["psycopg_connect_select1_ms"]["p50"],
                                         con["postgres"]["psycopg_connect_select1_ms"]["p50"]),
        "pooled_over_pgbouncer_cpu_per_connection": ratio(con["pgfleet-pooled"]["proxy_cpu_us_per_connection"],
                                                          con["pgbouncer"]["proxy_cpu_us_per_connection"]),
    }
    return out


def targets(rat: dict) -> dict:
    out = {}
    for wid, r in rat.items():
        if wid == "connect":
            continue
        checks = {
            "pooled_over_pgbouncer_tps": (r["pooled_over_pgbouncer_tps"], ">=", TARGETS["pooled_over_pgbouncer_tps"]),
            "direct_over_postgres_tps": (r["direct_over_postgres_tps"], ">=", TARGETS["direct_over_postgres_tps"]),
            "pooled_cpu_per_tx_over_pgbouncer": (r["pooled_over_pgbouncer_cpu_per_tx"], "<",
                                                 TARGETS["cpu_per_tx_over_pgbouncer"]),
        }
        out[wid] = {k: {"measured": m, "target": f"{op} {t}",
                        "met": None if m is None else (m >= t if op == ">=" else m < t)}
                    for k, (m, op, t) in checks.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=15, help="seconds per pgbench run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--clients", default="16,64")
    ap.add_argument("--memory-mb", type=int, default=1024, help="of the database (shared_buffers = 1/8)")
    ap.add_argument("--connect-duration", type=int, default=5, help="seconds of pgbench -C per config and round")
    ap.add_argument("--connect-samples", type=int, default=100, help="psycopg connections per config and round")
    ap.add_argument("--quick", action="store_true", help="a short run: 3 s per run, one round")
    ap.add_argument("--out", default="proxy", help="result name under bench/results/")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG (and report) from the JSON")
    ap.add_argument("--connect-loop", nargs=2, metavar=("KW", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.connect_loop:
        connect_loop_child(json.loads(args.connect_loop[0]), int(args.connect_loop[1]))
        return
    if args.replot:
        path = RESULTS / f"{args.out}.json"
        result = json.loads(path.read_text())
        plot(result, path.with_suffix(".png"))
        report(result)
        return
    if args.quick:
        args.duration, args.rounds, args.connect_duration, args.connect_samples = 3, 1, 2, 30
    args.clients = [int(c) for c in args.clients.split(",")]
    for tool in ("pgbench", "psql", "pgbouncer"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: run scripts/install-deps.sh (apt-packages.txt lists it)")

    load_before = loadavg()
    b = Bench(args)
    try:
        init_s = b.init_tables()
        pg = {k: b.psql("postgres", f"SHOW {k}") for k in ("server_version", "max_connections", "shared_buffers")}
        raw = b.run()
        pooling = b.d.api("GET", f"/v1/databases/{DBNAME}").get("pooling")
    finally:
        b.close()
    load_after = loadavg()

    summary = summarise_runs(raw["workloads"], raw["runs"], raw["connects"], raw["connect_samples_ms"])
    rat = ratios(summary)
    cvs = [c["cv_pct"] for cell in summary["tps"].values() for c in cell.values() if c["cv_pct"] is not None]
    result = {
        "benchmark": "proxy", "machine": machine(),
        "params": {"duration_s": args.duration, "rounds": args.rounds, "scale": args.scale, "jobs": args.jobs,
                   "clients": args.clients, "quick": args.quick, "init_s": round(init_s, 1),
                   "connect_duration_s": args.connect_duration, "connect_samples": args.connect_samples,
                   "database_memory_mb": args.memory_mb, "postgres": pg, "pgfleet_pooling": pooling,
                   "pgbouncer": {"version": tool_version("pgbouncer", "--version"), "pool_mode": "transaction",
                                 "default_pool_size": POOL_SIZE, "max_client_conn": 500,
                                 "auth": "clients: scram-sha-256 against a SCRAM verifier in auth_file; to the backend: unix socket, trust"},
                   "pgbench": tool_version("pgbench", "--version"),
                   "paths": {"postgres": "unix socket of the backend, trust",
                             "pgfleet-direct": "TCP 127.0.0.1, SCRAM", "pgfleet-pooled": "TCP 127.0.0.1, SCRAM",
                             "pgbouncer": "TCP 127.0.0.1, SCRAM", "pgbouncer-session": "TCP 127.0.0.1, SCRAM"},
                   "proxy_cpu": "utime+stime from /proc/<pid>/stat of the pgfleet daemon process (both listeners,"
                                " API) or of pgbouncer, before/after each run; user = the proxy's own code, kernel ="
                                " its syscalls, wakeups and context switches"},
        "noise": {"loadavg_before": load_before, "loadavg_after": load_after,
                  "other_work_pct_of_machine": summarise([r["other_work_pct"] for r in raw["runs"]]),
                  "other_work": "per run: the machine's busy CPU time minus pgbench, the pgfleet daemon, the "
                                "database's processes and PgBouncer, as a % of all CPUs (kernel threads doing our own I/O, "
                                "e.g. TPC-B's WAL flushes, count as other work); approximate: runs with many short-lived "
                                "processes (connect runs, aborted clients) can be off, read the median",
                  "median_cv_pct_across_rounds": median_or_none(cvs), "max_cv_pct_across_rounds": max(cvs) if cvs else None},
        "summary": summary, "ratios": rat, "targets": targets(rat),
        "runs": raw["runs"], "connects": raw["connects"], "connect_samples_ms": raw["connect_samples_ms"],
    }
    path = write_results(args.out, result)
    plot(result, path.with_suffix(".png"))
    report(result)
    print(f"wrote {path} and {path.with_suffix('.png')}")


def report(result: dict) -> None:
    s = result["summary"]
    print(f"{'median tps':<28}" + "".join(f"{c:>16}" for c in CONFIGS))
    for wid, cell in s["tps"].items():
        row = ""
        for c in CONFIGS:
            v = cell[c]
            row += f"{v['median_tps']:>16.0f}" if v["median_tps"] else f"{'FAILED':>16}"
        print(f"{wid:<28}{row}")
    print(f"{'proxy CPU us/tx (user+kern)':<28}" + "".join(f"{c:>20}" for c in PROXIES))
    for wid, cell in s["tps"].items():
        print(f"{wid:<28}" + "".join(
            f"{cell[c]['proxy_cpu_us_per_tx'] or float('nan'):>8.1f} ({cell[c].get('proxy_user_us_per_tx') or float('nan'):.1f}+"
            f"{cell[c].get('proxy_kernel_us_per_tx') or float('nan'):.1f})".rjust(20) for c in PROXIES))
    print(f"{'connect + SELECT 1':<28}" + "".join(f"{c:>16}" for c in CONFIGS))
    print(f"{'  psycopg p50 ms':<28}" + "".join(
        f"{s['connect'][c]['psycopg_connect_select1_ms']['p50']:>16.2f}" for c in CONFIGS))
    print(f"{'  pgbench -C ms':<28}" + "".join(
        f"{s['connect'][c]['pgbench_C_ms_per_connection_and_select1'] or float('nan'):>16.2f}" for c in CONFIGS))
    print(f"{'  proxy CPU us/conn':<28}{'':>16}" + "".join(
        f"{s['connect'][c]['proxy_cpu_us_per_connection'] or float('nan'):>16.1f}" for c in PROXIES))
    for wid, checks in result["targets"].items():
        for k, v in checks.items():
            met = {True: "met", False: "NOT MET", None: "n/a"}[v["met"]]
            print(f"target {wid} {k}: {v['measured']} {v['target']}: {met}")
    n = result["noise"]
    print(f"noise: load {n['loadavg_before']} -> {n['loadavg_after']}, round-to-round CV median "
          f"{n['median_cv_pct_across_rounds']}% max {n['max_cv_pct_across_rounds']}%; other work on the machine "
          f"during runs: p50 {n['other_work_pct_of_machine']['p50']}% max {n['other_work_pct_of_machine']['max']}%")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    wids = list(s["tps"])
    colors = {"postgres": "tab:gray", "pgfleet-direct": "tab:blue",
              "pgfleet-pooled": "tab:green", "pgbouncer": "tab:orange", "pgbouncer-session": "tab:red"}
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 5.2), gridspec_kw={"width_ratios": [3, 2, 1.4]})
    w = 0.8 / len(CONFIGS)
    for i, c in enumerate(CONFIGS):
        xs, ys, lo, hi, failed, labels = [], [], [], [], [], []
        for j, wid in enumerate(wids):
            v, base = s["tps"][wid][c], s["tps"][wid]["postgres"]["median_tps"]
            x = j + (i - (len(CONFIGS) - 1) / 2) * w
            if v["median_tps"] and base:
                xs.append(x)
                ys.append(v["median_tps"] / base)
                lo.append(max(0.0, (v["median_tps"] - v["min_tps"]) / base))
                hi.append(max(0.0, (v["max_tps"] - v["median_tps"]) / base))
                labels.append(f"{v['median_tps'] / 1000:.1f}k")
            else:
                failed.append(x)
        ax1.bar(xs, ys, w, yerr=[lo, hi], capsize=2, color=colors[c], label=c)
        for x, y, t in zip(xs, ys, labels):
            ax1.annotate(t, (x, 0.02), rotation=90, ha="center", va="bottom", fontsize=6, color="white")
        for x in failed:
            ax1.annotate("failed", (x, 0.02), rotation=90, ha="center", va="bottom", fontsize=7, color=colors[c])
    ax1.axhline(TARGETS["direct_over_postgres_tps"], color="tab:blue", linestyle=":", linewidth=1,
                label="direct target (0.9x Postgres)")
    ax1.set_xticks(range(len(wids)), wids, rotation=20, fontsize=8)
    ax1.set_ylabel("TPS relative to Postgres (whiskers: min-max)")
    ax1.set_title("pgbench throughput, relative to Postgres (labels: median TPS)")
    ax1.legend(fontsize=8)

    w = 0.8 / len(PROXIES)
    for i, c in enumerate(PROXIES):
        xs, kern, user = [], [], []
        for j, wid in enumerate(wids):
            v = s["tps"][wid][c]
            if v["proxy_cpu_us_per_tx"]:
                xs.append(j + (i - (len(PROXIES) - 1) / 2) * w)
                k, u = v.get("proxy_kernel_us_per_tx"), v.get("proxy_user_us_per_tx")
                if k is None or u is None:  # results from before the split: all of it as one bar
                    k, u = v["proxy_cpu_us_per_tx"], 0.0
                kern.append(k)
                user.append(u)
        ax2.bar(xs, kern, w, color=colors[c], label=c)
        ax2.bar(xs, user, w, bottom=kern, color=colors[c], hatch="///", edgecolor="white", linewidth=0)
    ax2.set_xticks(range(len(wids)), wids, rotation=20, fontsize=8)
    ax2.set_ylabel("proxy CPU per transaction (us): kernel, user hatched")
    ax2.set_title("proxy CPU cost")
    ax2.legend(fontsize=8)

    con = s["connect"]
    ys = [con[c]["psycopg_connect_select1_ms"]["p50"] for c in CONFIGS]
    ax3.bar(range(len(CONFIGS)), ys, color=[colors[c] for c in CONFIGS])
    for i, y in enumerate(ys):
        ax3.annotate(f"{y:.2f}", (i, y), ha="center", va="bottom", fontsize=8)
    ax3.set_xticks(range(len(CONFIGS)), CONFIGS, rotation=20, fontsize=8)
    ax3.set_ylabel("new connection + SELECT 1, p50 (ms, psycopg)")
    ax3.set_title("connection setup")
    p = result["params"]
    fig.suptitle(f"pgfleet proxy vs Postgres and PgBouncer (transaction mode, pool {POOL_SIZE}): scale {p['scale']}, "
                 f"-j {p['jobs']}, {p['duration_s']} s x {p['rounds']} rounds; {result['machine']['cpus']} CPUs, "
                 f"other work during runs p50 {result['noise']['other_work_pct_of_machine']['p50']:.0f}% of the machine",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
