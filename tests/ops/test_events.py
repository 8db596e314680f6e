"""Events: transitions, wakes with their latency, failed logins and refusals are structured
lines in daemon.log, in `pgfleet events` (and its live --follow) and in `db history`."""

from __future__ import annotations

import json
import subprocess
import time

import psycopg
import pytest

from pgfleet.fleet.events import EventLog

from ..conftest import PGFLEET, start_daemon, stop_daemon


def _wait_for(predicate, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def json_daemon(daemon_env):
    from pathlib import Path

    d = start_daemon(Path(daemon_env["PGFLEET_HOME"]), daemon_env, extra=("--log-format", "json"))
    try:
        yield d
    finally:
        stop_daemon(d)


def test_lifecycle_wake_and_auth_failure_are_events_everywhere(json_daemon):
    d = json_daemon
    follower = subprocess.Popen([*PGFLEET, "events", "--follow", "--json", "--limit", "0"], env=d.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        created = d.json("db", "create", "shop")
        d.cli("db", "suspend", "shop")
        with psycopg.connect(created["uri"], connect_timeout=60) as conn:  # wakes it
            assert conn.execute("SELECT 1").fetchone() == (1,)
        bad = created["uri"].replace(created["password"], "wrong-password")
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(bad, connect_timeout=60)

        events = d.json("events")
        kinds = [e["kind"] for e in events]
        assert {"created", "transition", "wake", "auth_failure"} <= set(kinds), kinds
        wake = next(e for e in events if e["kind"] == "wake")
        assert wake["database"] == "shop" and wake["latency_ms"] > 0
        failure = next(e for e in events if e["kind"] == "auth_failure")
        assert failure["user"] == "shop" and failure["peer"] == "127.0.0.1"
        # no secrets: the password appears nowhere in the events or the log
        assert created["password"] not in json.dumps(events)
        assert "wrong-password" not in json.dumps(events)

        history = d.json("db", "history", "shop")
        assert history[0]["at"] >= history[-1]["at"]  # newest first
        assert any(h["kind"] == "transition" and h["to"] == "standby" and h["reason"] == "suspended by user"
                   for h in history)
        assert any(h["kind"] == "wake" and h["latency_ms"] > 0 for h in history)
        assert any(h["kind"] == "auth_failure" for h in history)
        human = d.cli("db", "history", "shop").stdout
        assert "running -> draining (suspended by user)" in human and "wake" in human

        # the follower saw the same, live
        seen: list[dict] = []

        def followed_auth_failure():
            line = follower.stdout.readline()
            if line:
                seen.append(json.loads(line))
            return any(e["kind"] == "auth_failure" for e in seen)

        _wait_for(followed_auth_failure, what="the follower to print the auth failure")
        assert any(e["kind"] == "wake" for e in seen)

        # daemon.log: one JSON object per line, the events' fields under "event"
        log_lines = [json.loads(line) for line in (d.home / "daemon.log").read_text().splitlines()]
        logged = [rec["event"] for rec in log_lines if "event" in rec]
        assert {"wake", "auth_failure", "transition"} <= {e["kind"] for e in logged}
        assert created["password"] not in (d.home / "daemon.log").read_text()
    finally:
        follower.terminate()
        follower.wait(10)


def test_history_of_unknown_database_is_one_line(daemon):
    proc = daemon.cli("db", "history", "nope", check=False)
    assert proc.returncode == 1 and "does not exist" in proc.stderr and len(proc.stderr.splitlines()) == 1


async def test_ring_subscribers_and_noisy_events_are_bounded():
    log = EventLog(ring_size=50, noisy_per_second=5)
    for i in range(200):
        log.emit("transition", f"db{i}")
    assert len(log.ring) == 50 and log.recent(limit=1000)[0].database == "db150"
    # failed logins any client can cause: rate-limited, the suppressed count rides on the next one
    passed = [log.emit("auth_failure", "x") for _ in range(100)]
    assert sum(e is not None for e in passed) == 5
    # a follower that never reads is dropped once its queue is full, not buffered for
    sub = log.subscribe()
    from pgfleet.fleet import events as ev

    for i in range(ev.SUBSCRIBER_QUEUE + 10):
        log.emit("transition", "busy")
    assert sub.lost and sub not in log._subscribers
    assert sub.queue.qsize() <= ev.SUBSCRIBER_QUEUE
    subs = [log.subscribe() for _ in range(ev.MAX_SUBSCRIBERS)]
    with pytest.raises(ev.TooManySubscribers):
        log.subscribe()
    for s in subs:
        log.unsubscribe(s)
