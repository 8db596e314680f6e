"""Shared by the benchmarks: a throwaway daemon, percentiles, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

RESULTS = Path(__file__).resolve().parent / "results"
PGFLEET = [sys.executable, "-m", "pgfleet.cli.main"]


def summarise(samples_ms: list[float]) -> dict:
    s = sorted(samples_ms)

    def pct(p: float) -> float:
        if not s:
            return float("nan")
        k = (len(s) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(s) - 1)
        return round(s[lo] + (s[hi] - s[lo]) * (k - lo), 3)

    return {"n": len(s), "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
            "min": round(s[0], 3) if s else None, "max": round(s[-1], 3) if s else None,
            "mean": round(statistics.fmean(s), 3) if s else None}


def machine() -> dict:
    return {"host": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_results(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


@dataclass
class BenchDaemon:
    home: Path
    info: dict
    http: httpx.Client

    def api(self, method: str, path: str, json_body=None) -> dict:
        r = self.http.request(method, path, json=json_body)
        body = r.json()
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {r.status_code} {body.get('message')}")
        return body["data"]

    @property
    def proxy(self) -> tuple[str, int]:
        host, port = self.info["listen"].rsplit(":", 1)
        return host, int(port)

    def stop(self) -> None:
        subprocess.run([*PGFLEET, "down", "--home", str(self.home)], capture_output=True, timeout=600)


def start_daemon(driver: str = "sandbox", extra: tuple[str, ...] = ()) -> BenchDaemon:
    home = Path(tempfile.mkdtemp(prefix="pgfleet-bench-"))
    os.chmod(home, 0o711)
    proc = subprocess.run(
        [*PGFLEET, "up", "--detach", "--home", str(home), "--driver", driver, "--listen", "127.0.0.1:0",
         "--listen-pooled", "127.0.0.1:0", "--api", "127.0.0.1:0", "--listen-http", "127.0.0.1:0", *extra],
        capture_output=True, text=True, timeout=900,
    )
    if proc.returncode != 0:
        raise SystemExit(f"could not start a pgfleet daemon: {proc.stderr.strip()}")
    info = json.loads((home / "daemon.json").read_text())
    token = (home / "token").read_text().strip()
    http = httpx.Client(base_url=info["api_url"], headers={"Authorization": f"Bearer {token}"}, timeout=600)
    return BenchDaemon(home, info, http)
