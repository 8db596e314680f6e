"""Benchmark: one-shot SQL over HTTP against the pooled listener, for the same query.

    .venv/bin/python bench/http_sql.py [--rounds 300] [--seconds 3] [--concurrency 8]

One daemon (sandbox driver), one database, the query `SELECT $1::int + 1` with a parameter.
Latency, sampled interleaved round by round (the machine is noisy), each sample until the
result is in the client's hands:
  pooled_open  : psycopg on an open connection to the pooled listener (extended protocol)
  pooled_new   : a new psycopg connection (SCRAM) to the pooled listener, the query, close
  http         : POST /sql on a kept-alive HTTP/1.1 connection (what fetch does between
                 invocations of a warm function), the Neon driver's headers
  http_new     : POST /sql on a new TCP connection (Connection: close)
The HTTP client is a plain socket writing a prepared request and reading Content-Length bytes,
so that the client's own cost stays small next to the server's. Throughput: `--concurrency`
clients for `--seconds` each, asyncio (psycopg AsyncConnection; raw asyncio streams for HTTP).
Target: http p50 <= 2x pooled_open p50, and well under pooled_new p50.
Writes bench/results/http_sql.json and bench/results/http_sql.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import json
import os
import socket
import time

import psycopg

from bench.common import RESULTS, machine, start_daemon, summarise, write_results  # noqa: E402

QUERY = "SELECT $1::int + 1 AS n"
PSYCOPG_QUERY = "SELECT %s::int + 1 AS n"
TARGET_RATIO = 2.0


def http_request(host: str, port: int, db: str, password: str, close: bool) -> bytes:
    body = json.dumps({"query": QUERY, "params": [41]}).encode()
    head = (f"POST /sql HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n"
            f"Neon-Connection-String: postgresql://{db}:{password}@{db}.db.localhost/{db}\r\n"
            "Neon-Raw-Text-Output: true\r\nNeon-Array-Mode: true\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n")
    return head.encode() + body


def read_response(sock: socket.socket, buf: bytearray) -> bytes:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end]).lower()
    length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
    while len(buf) < end + length:
        buf += sock.recv(65536)
    body = bytes(buf[end:end + length])
    del buf[:end + length]
    if not head.startswith(b"http/1.1 200"):
        raise RuntimeError(f"HTTP error: {head[:40]!r} {body[:200]!r}")
    return body


class Clients:
    def __init__(self, d, db: str, password: str) -> None:
        self.http_host, port = d.info["listen_http"].rsplit(":", 1)
        self.http_port = int(port)
        host, pport = d.info["listen_pooled"].rsplit(":", 1)
        self.pooled = dict(host=host, port=int(pport), dbname=db, user=db, password=password, sslmode="disable")
        self.keep = http_request(self.http_host, self.http_port, db, password, close=False)
        self.once = http_request(self.http_host, self.http_port, db, password, close=True)
        self.conn = psycopg.connect(**self.pooled, autocommit=True)
        self.sock = socket.create_connection((self.http_host, self.http_port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def pooled_open(self) -> None:
        assert self.conn.execute(PSYCOPG_QUERY, (41,)).fetchone()[0] == 42

    def pooled_new(self) -> None:
        with psycopg.connect(**self.pooled, autocommit=True) as conn:
            assert conn.execute(PSYCOPG_QUERY, (41,)).fetchone()[0] == 42

    def http(self) -> None:
        self.sock.sendall(self.keep)
        assert b'[["42"]]' in read_response(self.sock, self.buf)

    def http_new(self) -> None:
        with socket.create_connection((self.http_host, self.http_port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(self.once)
            assert b'[["42"]]' in read_response(sock, bytearray())


async def throughput_pooled(c: Clients, seconds: float, concurrency: int) -> float:
    conns = [await psycopg.AsyncConnection.connect(**c.pooled, autocommit=True) for _ in range(concurrency)]
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(conn) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await (await conn.execute(PSYCOPG_QUERY, (41,))).fetchone()
            done += 1

    t = time.perf_counter()
    await asyncio.gather(*(worker(x) for x in conns))
    elapsed = time.perf_counter() - t
    for x in conns:
        await x.close()
    return done / elapsed


async def throughput_http(c: Clients, seconds: float, concurrency: int) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection(c.http_host, c.http_port)
        while time.perf_counter() < stop:
            writer.write(c.keep)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
            assert head.startswith(b"HTTP/1.1 200") and b"42" in body
            done += 1
        writer.close()

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - t)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (the daemon: proxy and HTTP listener alike)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    d = start_daemon("sandbox")
    try:
        created = d.api("POST", "/v1/databases", {"name": "bench", "scale_to_zero": {"policy": "off"}})
        c = Clients(d, "bench", created["password"])
        kinds = ["pooled_open", "pooled_new", "http", "http_new"]
        for kind in kinds:  # warm up: pool connections, the password cache, code paths
            for _ in range(20):
                getattr(c, kind)()
        samples: dict[str, list[float]] = {k: [] for k in kinds}
        for i in range(args.rounds):
            for kind in kinds if i % 2 == 0 else reversed(kinds):
                t = time.perf_counter()
                getattr(c, kind)()
                samples[kind].append((time.perf_counter() - t) * 1000)
        throughput: dict[str, float] = {}
        cpu_us: dict[str, float] = {}  # the daemon's CPU per query: robust on a loaded machine
        pid = d.info["pid"]
        for rnd in range(2):  # interleaved twice, the best of each
            for name, fn in (("pooled_open", throughput_pooled), ("http", throughput_http)):
                before = cpu_seconds(pid)
                qps = asyncio.run(fn(c, args.seconds, args.concurrency))
                per_query = (cpu_seconds(pid) - before) / (qps * args.seconds) * 1e6
                throughput[name] = max(throughput.get(name, 0.0), round(qps, 1))
                cpu_us[name] = round(min(cpu_us.get(name, 1e9), per_query), 1)
        summary = {k: summarise(v) for k, v in samples.items()}
        ratio = summary["http"]["p50"] / summary["pooled_open"]["p50"]
        verdict = {
            "http_p50_over_pooled_open_p50": round(ratio, 2),
            "target_ratio": TARGET_RATIO,
            "ratio_met": ratio <= TARGET_RATIO,
            "http_p50_over_pooled_new_p50": round(summary["http"]["p50"] / summary["pooled_new"]["p50"], 3),
            "http_new_p50_over_pooled_new_p50": round(summary["http_new"]["p50"] / summary["pooled_new"]["p50"], 3),
            "throughput_http_over_pooled_open": round(throughput["http"] / throughput["pooled_open"], 2),
            "daemon_cpu_us_per_query": cpu_us,
            "load_average": os.getloadavg()[0],
        }
        data = {"machine": machine(), "query": QUERY, "rounds": args.rounds, "latency_ms": summary,
                "throughput_qps": throughput, "concurrency": args.concurrency, "verdict": verdict}
        path = write_results("http_sql", data)
        plot(samples, summary, throughput, RESULTS / "http_sql.png")
        print(json.dumps({"latency_p50_ms": {k: v["p50"] for k, v in summary.items()},
                          "throughput_qps": throughput, "verdict": verdict}, indent=2))
        print(f"written: {path}", file=sys.stderr)
        c.conn.close()
        c.sock.close()
    finally:
        d.stop()


def plot(samples: dict, summary: dict, throughput: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = ["pooled_open", "http", "http_new", "pooled_new"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    ax.boxplot([samples[k] for k in order], tick_labels=order, orientation="horizontal", showfliers=False)
    for i, k in enumerate(order, start=1):
        ax.annotate(f"p50 {summary[k]['p50']:.2f} ms", (summary[k]["p50"], i + 0.3), fontsize=8)
    ax.axvline(TARGET_RATIO * summary["pooled_open"]["p50"], color="tab:orange", linestyle="--", linewidth=1,
               label="target: 2x pooled_open p50")
    ax.set_xscale("log")
    ax.set_xlabel("query latency, client to result (ms, log)")
    ax.set_title("SQL over HTTP vs the pooled listener: SELECT $1::int + 1")
    ax.legend(loc="lower right", fontsize=8)
    names = list(throughput)
    bx.bar(names, [throughput[n] for n in names], color=["tab:blue", "tab:green"])
    bx.set_ylabel("queries/s")
    bx.set_title("throughput (open connections)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
