"""Bounded proxy memory (issue 10, item 7): a message the pooler must read whole is capped
(54000, connection closed cleanly), and what it holds for all clients has a budget."""

from __future__ import annotations

import asyncio

import pytest

from pgfleet.proxy.guards import GuardLimits, ProxyGuards
from pgfleet.proxy.server import ProxyServer

from .wire import error_then_eof, login

HUGE = 300 << 20
CHUNK = 1 << 20


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def _send_huge_parse(writer: asyncio.StreamWriter, size: int, on_chunk=None, stop=None) -> int:
    """A named Parse whose length word says `size` bytes, then its body, until all of it
    is sent, `stop` is done or the proxy closes the connection. Returns the bytes sent."""
    body_start = b"stmt1\0SELECT '"
    writer.write(b"P" + (size + 4).to_bytes(4, "big") + body_start)
    sent = len(body_start)
    zeros = b"x" * CHUNK
    try:
        while sent < size:
            writer.write(zeros[: min(CHUNK, size - sent)])
            sent += min(CHUNK, size - sent)
            await writer.drain()
            if on_chunk is not None:
                on_chunk()
            if stop is not None and stop.done():
                break
    except (ConnectionError, OSError):
        pass
    return sent


async def test_a_300_MB_named_parse_does_not_grow_the_daemon(daemon):
    created = daemon.json("db", "create", "mem")
    pid = daemon.info["pid"]
    port = int(daemon.info["listen_pooled"].rsplit(":", 1)[1])
    reader, writer = await login(port, created["name"], created["password"], "mem")
    before = _rss_bytes(pid)
    peak = [before]
    try:
        answer = asyncio.ensure_future(error_then_eof(reader))
        sent = await _send_huge_parse(writer, HUGE, lambda: peak.append(_rss_bytes(pid)), answer)
        fields = await answer
    finally:
        writer.close()
    peak.append(_rss_bytes(pid))
    assert fields["C"] == "54000", fields
    assert "longer than the pooled listener reads" in fields["M"]
    growth = max(peak) - before
    assert growth <= 20 << 20, f"daemon RSS grew by {growth >> 20} MiB (sent {sent >> 20} MiB)"
    # the daemon is fine and serves the next client
    _, w = await login(port, created["name"], created["password"], "mem")
    w.close()


async def test_messages_read_whole_share_one_budget_across_clients(env):
    limits = GuardLimits(max_read_whole=1 << 20, memory_budget=3 << 20)
    guards = ProxyGuards(limits)
    server = ProxyServer(env.fleet, "127.0.0.1", 0, mode="transaction", guards=guards)
    await server.start()
    clients = []
    try:
        created = await env.fleet.create("budget")
        for _ in range(4):
            clients.append(await login(server.port, created.row.role, created.password, "budget"))
        # three clients each start a named Parse of almost 1 MiB and stall half-way
        for _, w in clients[:3]:
            w.write(b"P" + ((1 << 20) - 100).to_bytes(4, "big") + b"s\0SELECT '" + b"x" * 1000)
            await w.drain()
        async with asyncio.timeout(10):
            while guards.memory.used < 3 * ((1 << 20) - 100):
                await asyncio.sleep(0.01)
        r, w = clients[3]
        w.write(b"P" + ((1 << 20) - 100).to_bytes(4, "big") + b"s\0SELECT '" + b"x" * 1000)
        fields = await error_then_eof(r)
        assert fields["C"] == "54000" and "exhausted" in fields["M"], fields
        for _, w in clients[:3]:
            w.close()
        async with asyncio.timeout(10):
            while guards.memory.used:
                await asyncio.sleep(0.01)
    finally:
        for _, w in clients:
            w.close()
        await server.close()


async def test_remembered_statement_texts_are_shared_and_budgeted(env):
    guards = ProxyGuards(GuardLimits(memory_budget=64 << 10))
    server = ProxyServer(env.fleet, "127.0.0.1", 0, mode="transaction", guards=guards)
    await server.start()
    try:
        created = await env.fleet.create("stmts")
        text = b"SELECT '" + b"y" * 4000 + b"'\0\0\0"
        a = await login(server.port, created.row.role, created.password, "stmts")
        b = await login(server.port, created.row.role, created.password, "stmts")
        for r, w in (a, b):  # the same statement from two clients: its text is held once
            w.write(b"P" + (4 + 2 + len(text)).to_bytes(4, "big") + b"s\0" + text + b"S\0\0\0\4")
            await _until_ready(r)
        assert len(server.pools[created.row.uuid].texts) == 1
        assert guards.memory.used < 2 * len(text)
        # one client preparing ever more statements runs into the budget: 54000, not memory
        r, w = a
        for i in range(100):
            other = text.replace(b"SELECT", b"SELECT %d," % i)
            name = b"s%d\0" % i
            w.write(b"P" + (4 + len(name) + len(other)).to_bytes(4, "big") + name + other)
        w.write(b"S\0\0\0\4")
        fields = await error_then_eof(r)
        assert fields["C"] == "54000" and "prepared statements" in fields["M"], fields
        b[1].close()
        async with asyncio.timeout(10):
            while guards.memory.used:
                await asyncio.sleep(0.01)
    finally:
        await server.close()


async def _until_ready(reader: asyncio.StreamReader) -> None:
    from pgfleet.pgwire import messages as m
    from pgfleet.pgwire.protocol import BackendMsg

    async with asyncio.timeout(30):
        while True:
            kind, body = await m.read_message(reader)
            assert kind != BackendMsg.ERROR_RESPONSE, m.parse_error_fields(body)
            if kind == BackendMsg.READY_FOR_QUERY:
                return
