"""Failed logins (issue 10, item 9): after repeated failures a (role, source address) pair
must wait, doubling, before it may try again; each failure is an event (daemon.log,
`pgfleet events`) with its source."""

from __future__ import annotations

import pytest

from pgfleet.proxy.errors import ClientError
from pgfleet.proxy.guards import GuardLimits, LoginThrottle, ProxyGuards
from pgfleet.proxy.server import ProxyServer

from .wire import LoginRefused, login


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _blocked(throttle: LoginThrottle, role: str, source: str) -> bool:
    try:
        throttle.check(role, source)
    except ClientError as exc:
        assert exc.sqlstate == "28000"
        return True
    return False


def test_backoff_doubles_per_role_and_source_and_success_resets_it():
    clock = Clock()
    t = LoginThrottle(GuardLimits(free_login_failures=3, backoff_base_s=1, backoff_max_s=8), clock)
    for _ in range(2):
        t.failed("alice", "10.0.0.1")
    assert not _blocked(t, "alice", "10.0.0.1")
    t.failed("alice", "10.0.0.1")  # the third: wait 1 s
    assert _blocked(t, "alice", "10.0.0.1")
    assert not _blocked(t, "alice", "10.0.0.2")  # another address
    assert not _blocked(t, "bob", "10.0.0.1")  # another role
    clock.now += 1.01
    assert not _blocked(t, "alice", "10.0.0.1")
    t.failed("alice", "10.0.0.1")  # the fourth: 2 s
    clock.now += 1.5
    assert _blocked(t, "alice", "10.0.0.1")
    for _ in range(10):
        t.failed("alice", "10.0.0.1")
    clock.now += 7.9
    assert _blocked(t, "alice", "10.0.0.1")  # capped at backoff_max_s...
    clock.now += 0.2
    assert not _blocked(t, "alice", "10.0.0.1")  # ...and no longer
    t.succeeded("alice", "10.0.0.1")
    t.failed("alice", "10.0.0.1")
    assert not _blocked(t, "alice", "10.0.0.1")  # a success started the count again


def test_one_source_spraying_roles_is_backed_off_and_memory_is_bounded():
    clock = Clock()
    t = LoginThrottle(GuardLimits(free_login_failures=3, free_source_failures=20, max_tracked_logins=100), clock)
    for i in range(20):
        t.failed(f"role{i}", "10.0.0.9")
    assert _blocked(t, "anyone", "10.0.0.9")
    for i in range(5000):
        t.failed(f"role{i}" * 10, f"10.1.{i // 250}.{i % 250}")
    assert len(t._entries) <= 100


@pytest.mark.parametrize("mode", ["session", "transaction"])
async def test_repeated_failed_logins_back_off_and_are_logged_with_their_source(env, mode):
    guards = ProxyGuards(GuardLimits(free_login_failures=2, backoff_base_s=60))
    server = ProxyServer(env.fleet, "127.0.0.1", 0, mode=mode, guards=guards)
    await server.start()
    try:
        created = await env.fleet.create("victim")
        role = created.row.role
        for _ in range(2):
            with pytest.raises(LoginRefused) as refused:
                await login(server.port, role, "wrong-password", "victim")
            assert refused.value.fields["C"] == "28P01"
        # now even the right password must wait, from this address
        with pytest.raises(LoginRefused) as refused:
            await login(server.port, role, created.password, "victim")
        assert refused.value.fields["C"] == "28000" and "too many failed" in refused.value.fields["M"]
        # from another address the right password works
        _, w = await login(server.port, role, created.password, "victim", source="127.0.0.2")
        w.close()
        events = env.fleet.events.recent("victim", kinds={"auth_failure", "connection_refused"})
        failures = [e.fields for e in events if e.kind == "auth_failure"]
        listener = "pooled" if mode == "transaction" else "direct"
        assert sorted(f["failures"] for f in failures) == [1, 2], failures
        for f in failures:
            assert f["user"] == role and f["peer"] == "127.0.0.1" and f["listener"] == listener
        refused = [e.fields for e in events if e.kind == "connection_refused"]
        assert refused and refused[0]["reason"] == "login backoff" and refused[0]["peer"] == "127.0.0.1"
    finally:
        await server.close()
