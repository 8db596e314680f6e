"""The daemon and CLI end to end, as a user drives them: real processes, real psql/libpq."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pgfleet.config import pid_alive

from .conftest import PGFLEET, postmasters_under, start_daemon, stop_daemon
from .polling import wait_until


def _psql(d, uri: str, sql: str) -> str:
    proc = subprocess.run(["psql", uri, "-XAtc", sql], env=d.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_create_show_and_psql_through_the_uri(daemon):
    created = daemon.json("db", "create", "shop", "--cooldown-ms", "60000")
    assert set(created) >= {"name", "uuid", "state", "uri", "pooled_uri", "password"}
    assert created["state"] == "running" and created["password"] in created["uri"]
    shown = daemon.json("db", "show", "shop")
    assert "password" not in shown and created["password"] not in shown["uri"]
    assert shown["backend"].startswith("unix:") and shown["backend_user"] == "postgres"
    # the password was saved for libpq, so the password-less URI works as the README says
    assert _psql(daemon, shown["uri"], "SELECT current_database(), current_user") == "shop|shop"
    assert _psql(daemon, shown["pooled_uri"], "SELECT 42") == "42"
    # host-side tools reach the backend without a password
    backend_dir = shown["backend"].removeprefix("unix:")
    out = subprocess.run(["psql", "-h", backend_dir, "-U", shown["backend_user"], "-d", "shop", "-XAtc",
                          "SELECT rolname FROM pg_roles WHERE rolname='shop'"], capture_output=True, text=True)
    assert out.stdout.strip() == "shop", out.stderr
    listed = daemon.json("db", "list")
    assert [d["name"] for d in listed] == ["shop"]
    human = daemon.cli("db", "list").stdout
    assert "shop" in human and "running" in human


def test_logs_show_the_servers_log(daemon):
    daemon.cli("db", "create", "chatty")
    out = daemon.cli("db", "logs", "chatty").stdout
    assert "database system is ready to accept connections" in out
    shown = daemon.json("db", "logs", "chatty", "--bytes", "10")
    assert len(shown["log"]) <= 10 and shown["size"] > 10
    proc = daemon.cli("db", "logs", "nope", check=False)
    assert proc.returncode == 1 and "does not exist" in proc.stderr


def test_status_and_token(daemon):
    status = daemon.json("status")
    assert status["driver"] == "sandbox" and status["databases"] == 0
    token = daemon.cli("token").stdout.strip()
    assert token == (daemon.home / "token").read_text().strip()
    assert oct((daemon.home / "token").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("args,needle", [
    (["db", "create", "Bad_Name"], "invalid database name"),
    (["db", "create", "--", "-leading"], "invalid database name"),
    (["db", "create"], "Missing argument"),
    (["db", "create", "x", "--memory-mb", "lots"], "valid integer"),
    (["db", "create", "x" * 64], "invalid database name"),
    (["db", "create", "postgres"], "reserved"),
    (["db", "create", "okname", "--memory-mb", "1"], "memory_mb"),
    (["db", "create", "okname", "--cooldown-ms", "-5"], "cooldown"),
    (["db", "create", "okname", "--policy", "sometimes"], "policy"),
    (["db", "show", "missing"], "does not exist"),
    (["db", "suspend", "missing"], "does not exist"),
    (["db", "delete", "missing"], "does not exist"),
])
def test_bad_input_is_one_line_and_changes_nothing(daemon, args, needle):
    proc = daemon.cli(*args, check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert daemon.json("db", "list") == []


def test_duplicate_name_is_refused(daemon):
    daemon.cli("db", "create", "twice")
    proc = daemon.cli("db", "create", "twice", check=False)
    assert proc.returncode == 1 and "already exists" in proc.stderr
    assert len(daemon.json("db", "list")) == 1


def test_cli_without_a_daemon_says_so(daemon_env, tmp_path):
    env = dict(daemon_env, PGFLEET_HOME=str(tmp_path / "nowhere"))
    proc = subprocess.run([*PGFLEET, "db", "list"], env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "no pgfleet daemon is running" in proc.stderr


def test_suspend_resume_delete_cycle(daemon):
    uri = daemon.json("db", "create", "cyc")["uri"]
    _psql(daemon, uri, "CREATE TABLE t AS SELECT 1 AS x")
    assert daemon.json("db", "suspend", "cyc")["state"] == "standby"
    assert postmasters_under(daemon.home) == []
    assert daemon.json("db", "resume", "cyc")["state"] == "running"
    assert _psql(daemon, uri, "SELECT x FROM t") == "1"
    data_dir = daemon.home / "instances" / daemon.json("db", "show", "cyc")["uuid"]
    assert data_dir.exists()
    daemon.cli("db", "delete", "cyc")
    assert not data_dir.exists() and postmasters_under(daemon.home) == []
    assert daemon.json("db", "list") == []
    # the saved password went with it
    assert "cyc" not in Path(daemon.env["PGPASSFILE"]).read_text()


def test_daemon_kill_9_loses_nothing_and_leaves_no_twin(daemon_env):
    home = Path(daemon_env["PGFLEET_HOME"])
    d = start_daemon(home, daemon_env)
    try:
        uri_run = d.json("db", "create", "alive")["uri"]
        uri_sb = d.json("db", "create", "asleep")["uri"]
        _psql(d, uri_run, "CREATE TABLE t AS SELECT generate_series(1, 500) AS x")
        _psql(d, uri_sb, "CREATE TABLE t AS SELECT generate_series(1, 300) AS x")
        d.cli("db", "suspend", "asleep")
        before = postmasters_under(home)
        assert len(before) > 0
        os.kill(d.info["pid"], signal.SIGKILL)
        _wait_gone(d.info["pid"])
        # Postgres outlives the daemon (its own session and namespaces)...
        assert set(postmasters_under(home)) == set(before)
        d = start_daemon(home, daemon_env, like=d)
        # ...and the new daemon adopts it instead of starting a second one on the same data
        assert set(postmasters_under(home)) == set(before)
        states = {r["name"]: r["state"] for r in d.json("db", "list")}
        assert states == {"alive": "running", "asleep": "standby"}
        assert _psql(d, d.json("db", "show", "alive")["uri"], "SELECT count(*) FROM t") == "500"
        assert _psql(d, d.json("db", "show", "asleep")["uri"], "SELECT count(*) FROM t") == "300"
    finally:
        stop_daemon(d)


def test_half_made_database_is_rolled_back_after_a_crash(daemon_env):
    """A row whose creation never finished (crash mid-create) is undone at the next start."""
    from pgfleet.store import InstanceRow, Store

    home = Path(daemon_env["PGFLEET_HOME"])
    home.mkdir(parents=True)
    store = Store(home / "state.db")
    store.insert(InstanceRow(uuid="half-made", name="half", slot=9, state="starting", driver="sandbox",
                             image="postgres:15", memory_mb=128, role="half", verifier="x", stz_policy="on",
                             cooldown_ms=1000, created_at=time.time()))
    (home / "instances" / "half-made" / "data.partial").mkdir(parents=True)
    store.close()
    d = start_daemon(home, daemon_env)
    try:
        assert d.json("db", "list") == []
        assert not (home / "instances" / "half-made").exists()
    finally:
        stop_daemon(d)


def test_down_suspends_everything_cleanly_and_up_brings_it_back(daemon_env):
    home = Path(daemon_env["PGFLEET_HOME"])
    d = start_daemon(home, daemon_env)
    uri = d.json("db", "create", "keep", "--policy", "off")["uri"]
    _psql(d, uri, "CREATE TABLE t AS SELECT 7 AS x")
    d.cli("down")
    assert postmasters_under(home) == []
    assert not (home / "daemon.json").exists()
    d = start_daemon(home, daemon_env, like=d)
    try:
        # policy off: it is brought back up at start, with its data
        shown = d.json("db", "show", "keep")
        assert shown["state"] == "running"
        assert _psql(d, shown["uri"], "SELECT x FROM t") == "7"
    finally:
        stop_daemon(d)


def test_second_daemon_on_the_same_home_is_refused(daemon):
    proc = daemon.cli("up", "--detach", "--listen", "127.0.0.1:0", "--listen-pooled", "127.0.0.1:0",
                      "--listen-http", "127.0.0.1:0", "--api", "127.0.0.1:0", check=False)
    assert proc.returncode == 1 and "already running" in proc.stderr


def _wait_gone(pid: int, timeout: float = 30) -> None:
    wait_until(lambda: not pid_alive(pid), timeout, f"pid {pid} to exit", interval=0.01)
