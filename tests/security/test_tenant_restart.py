"""Issue 10 item 4: root never trusts tenant-controlled files. A tenant replaces its
postmaster.pid with a FIFO, a symlink to /dev/zero or a huge file, then the daemon crashes:
the next daemon must be serving within seconds, and each database comes back."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pgfleet.config import pid_alive

from ..conftest import SANDBOX_SKIP, start_daemon, stop_daemon

pytestmark = pytest.mark.skipif(SANDBOX_SKIP is not None, reason=f"SKIPPED LOUDLY: {SANDBOX_SKIP}")

TRAPS = {
    "fifo": lambda p: os.mkfifo(p),
    "zero": lambda p: os.symlink("/dev/zero", p),
    "huge": lambda p: os.truncate(os.open(p, os.O_WRONLY | os.O_CREAT, 0o600), 8 << 30),  # sparse 8 GiB
}


def _psql(d, uri: str, sql: str) -> str:
    proc = subprocess.run(["psql", uri, "-XAtc", sql], env=d.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_trapped_postmaster_pid_cannot_stall_a_restart(daemon_env):
    home = Path(daemon_env["PGFLEET_HOME"])
    d = start_daemon(home, daemon_env)
    try:
        for name in TRAPS:
            _psql(d, d.json("db", "create", name)["uri"], "CREATE TABLE t AS SELECT 7 AS x")
        os.kill(d.info["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while pid_alive(d.info["pid"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # the postmasters outlive the daemon; each tenant swaps its lock file for a trap
        for row in _rows(home):
            pidfile = home / "instances" / row["uuid"] / "data" / "postmaster.pid"
            owner = pidfile.parent.stat().st_uid
            pidfile.unlink()
            TRAPS[row["name"]](pidfile)
            os.lchown(pidfile, owner, owner)
        t0 = time.monotonic()
        try:
            d = start_daemon(home, daemon_env, like=d)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\ndaemon.log: {(home / 'daemon.log').read_text()[-3000:]}") from None
        assert time.monotonic() - t0 < 30, "a restart must not stall on tenant files"
        for name in TRAPS:  # recovered: each answers, through its WAL if it had to be restarted
            assert _psql(d, d.json("db", "show", name)["uri"], "SELECT x FROM t") == "7"
    finally:
        stop_daemon(d)


def _rows(home: Path) -> list[dict]:
    import sqlite3

    db = sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True)
    try:
        return [{"uuid": u, "name": n} for u, n in db.execute("SELECT uuid, name FROM instances")]
    finally:
        db.close()
