"""The in-memory registry of databases in use: made on first use, dropped once unused."""

from __future__ import annotations

import asyncio

from pgfleet.drivers.base import Backend
from pgfleet.fleet.runtime import Runtimes, Sessions
from tests.polling import until


async def test_a_runtime_lives_only_while_something_uses_it():
    rts = Runtimes()
    async with rts.locked("a") as rt:
        assert rts.is_known("a") and rt.holders == 1
    assert not rts.is_known("a"), "dropped once its lock is released and nothing else holds it"
    async with rts.locked("a") as rt:
        rt.backend = Backend(host="127.0.0.1", port=5432)
    assert rts.is_up("a") and rts.backend_of("a") == Backend(host="127.0.0.1", port=5432)
    rts.drop("a")
    assert not rts.is_up("a") and rts.backend_of("a") is None and list(rts) == []


async def test_the_lock_serialises_and_a_waiter_keeps_the_runtime():
    rts = Runtimes()
    order: list[str] = []
    first_in = asyncio.Event()
    release = asyncio.Event()

    async def first():
        async with rts.locked("a"):
            first_in.set()
            await release.wait()
            order.append("first")

    async def second():
        async with rts.locked("a"):
            order.append("second")

    one = asyncio.ensure_future(first())
    await first_in.wait()
    two = asyncio.ensure_future(second())
    await until(lambda: rts["a"].holders == 2, what="the second to wait for the lock")
    release.set()
    await asyncio.gather(one, two)
    assert order == ["first", "second"] and "a" not in rts


def test_sessions_of_an_unknown_database_are_none():
    rts = Runtimes()
    assert rts.sessions("nope") == Sessions(open=0, total=0)
    rt = rts.of("a")
    rt.clients, rt.total_connections = 2, 5
    assert rts.sessions("a") == Sessions(open=2, total=5)
