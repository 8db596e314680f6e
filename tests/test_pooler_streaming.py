"""Huge messages stream through the pooled listener: the proxy (in this process) holds
only a small part of a message at a time, however large it is. A raw protocol client that
never holds a whole message itself, so that this process's peak memory is the proxy's."""

from __future__ import annotations

import asyncio
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scramp import ScramClient

from pgfleet.pgwire import messages as m
from pgfleet.pgwire.protocol import BackendMsg, FrontendMsg, Target, byte
from pgfleet.proxy.server import ProxyServer

MB = 1024 * 1024
SIZE = 200 * MB  # one DataRow, one CopyData message
#: the proxy's peak memory may grow by this much at most while a SIZE message passes
BUDGET = 40 * MB


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def reset_peak() -> int:
    """Reset this process's peak RSS to its current RSS (Linux clear_refs 5); the RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


class RawClient:
    """Startup and SCRAM by hand; then bytes, read and written in bounded pieces."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, name: str, password: str) -> "RawClient":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(m.startup_message({"user": name, "database": name}))
        scram = ScramClient(["SCRAM-SHA-256"], name, password)
        while True:
            kind, body = await m.read_message(reader)
            if kind == BackendMsg.AUTHENTICATION:
                code = int.from_bytes(body[:4], "big")
                if code == m.AUTH_SASL:
                    first = scram.get_client_first().encode()
                    writer.write(m.message(FrontendMsg.PASSWORD, b"SCRAM-SHA-256\0" + len(first).to_bytes(4, "big") + first))
                elif code == m.AUTH_SASL_CONTINUE:
                    scram.set_server_first(body[4:].decode())
                    writer.write(m.message(FrontendMsg.PASSWORD, scram.get_client_final().encode()))
                elif code == m.AUTH_SASL_FINAL:
                    scram.set_server_final(body[4:].decode())
            elif kind == BackendMsg.ERROR_RESPONSE:
                raise AssertionError(m.parse_error_fields(body))
            elif kind == BackendMsg.READY_FOR_QUERY:
                return cls(reader, writer)

    async def until_ready(self) -> tuple[dict[int, int], list[tuple[int, bytes]]]:
        """Read up to ReadyForQuery: bytes of body per message kind, and the small messages
        (under 64 kB) whole. Large bodies are counted as they pass, never kept."""
        sizes: dict[int, int] = {}
        small: list[tuple[int, bytes]] = []
        while True:
            kind, length = await self._header()
            sizes[kind] = sizes.get(kind, 0) + length
            if length < 64 * 1024:
                body = await self.reader.readexactly(length)
                small.append((kind, body))
                if kind == BackendMsg.READY_FOR_QUERY:
                    return sizes, small
                continue
            left = length
            while left:
                left -= len(await self.reader.read(min(left, MB)))

    async def _header(self) -> tuple[int, int]:
        head = await self.reader.readexactly(5)
        return head[0], int.from_bytes(head[1:], "big") - 4

    async def query(self, sql: str):
        self.writer.write(m.message(FrontendMsg.QUERY, m.cstr(sql)))
        return await self.until_ready()

    async def close(self) -> None:
        self.writer.write(m.message(FrontendMsg.TERMINATE))
        self.writer.close()


def _first_value(small: list[tuple[int, bytes]]) -> bytes:
    body = next(b for k, b in small if k == BackendMsg.DATA_ROW)
    n = int.from_bytes(body[2:6], "big")
    return body[6 : 6 + n]


async def test_a_huge_row_streams_through(env, pooled):
    created = await env.fleet.create("bigrow", memory_mb=2048, pool_size=1)
    c = await RawClient.connect(pooled.port, "bigrow", created.password)
    try:
        await c.query("SELECT 1")  # the server connection is open: not part of the measure
        rss = reset_peak()
        sizes, small = await c.query(f"SELECT repeat('x', {SIZE})")
        grew = _status("VmHWM") - rss
        # the DataRow: column count (2), value length (4), value
        assert sizes[BackendMsg.DATA_ROW] == 2 + 4 + SIZE, sizes
        assert grew < BUDGET, f"peak memory grew by {grew / MB:.0f} MB for a {SIZE / MB:.0f} MB row"
        # the session goes on
        _, small = await c.query("SELECT 'after'")
        assert _first_value(small) == b"after"
    finally:
        await c.close()


async def test_a_huge_copy_data_message_streams_through(env, pooled):
    created = await env.fleet.create("bigcopy", memory_mb=2048, pool_size=1)
    c = await RawClient.connect(pooled.port, "bigcopy", created.password)
    try:
        await c.query("CREATE TABLE t(s text)")
        c.writer.write(m.message(FrontendMsg.QUERY, m.cstr("COPY t FROM STDIN")))
        kind, length = await c._header()
        assert kind == BackendMsg.COPY_IN_RESPONSE, kind  # CopyInResponse
        await c.reader.readexactly(length)
        rss = reset_peak()
        # one CopyData message of SIZE bytes (one line), written a piece at a time
        piece = b"y" * MB
        c.writer.write(b"d" + (SIZE + 1 + 4).to_bytes(4, "big"))
        for _ in range(SIZE // MB):
            c.writer.write(piece)
            await c.writer.drain()
        c.writer.write(b"\n" + m.message(FrontendMsg.COPY_DONE))  # the end of the line, CopyDone
        sizes, small = await c.until_ready()
        grew = _status("VmHWM") - rss
        assert BackendMsg.ERROR_RESPONSE not in sizes, small
        assert any(k == BackendMsg.COMMAND_COMPLETE and body.startswith(b"COPY 1") for k, body in small), small
        assert grew < BUDGET, f"peak memory grew by {grew / MB:.0f} MB for a {SIZE / MB:.0f} MB message"
        _, small = await c.query("SELECT length(s) FROM t")
        assert _first_value(small) == str(SIZE).encode()
    finally:
        await c.close()


async def _send_big(c: RawClient, kind: int, prefix: bytes, size: int, fill: bytes, suffix: bytes) -> None:
    """One message of `size` bytes of `fill` between prefix and suffix, written a piece at a time."""
    c.writer.write(byte(kind) + (4 + len(prefix) + size + len(suffix)).to_bytes(4, "big") + prefix)
    piece = fill * MB
    for _ in range(size // MB):
        c.writer.write(piece)
        await c.writer.drain()
    c.writer.write(fill * (size % MB) + suffix)


async def test_a_huge_query_and_bind_stream_through(env, pooled):
    """A simple Query and a Bind of a named statement (whose name the proxy rewrites) with
    a huge text: neither is held whole by the proxy."""
    created = await env.fleet.create("bigbind", memory_mb=2048, pool_size=1)
    c = await RawClient.connect(pooled.port, "bigbind", created.password)
    try:
        c.writer.write(_parse("st", "SELECT length($1::text)") + _SYNC)
        sizes, small = await c.until_ready()
        assert BackendMsg.ERROR_RESPONSE not in sizes, small
        rss = reset_peak()
        await _send_big(c, FrontendMsg.QUERY, b"SELECT length('", SIZE, b"q", b"')\0")
        sizes, small = await c.until_ready()
        assert _first_value(small) == str(SIZE).encode(), small
        # Bind: unnamed portal, statement "st", no formats, one parameter of SIZE bytes, no result formats
        await _send_big(c, FrontendMsg.BIND, b"\0st\0\0\0\0\x01" + SIZE.to_bytes(4, "big"), SIZE, b"b", b"\0\0")
        c.writer.write(_EXECUTE + _SYNC)
        sizes, small = await c.until_ready()
        grew = _status("VmHWM") - rss
        assert _first_value(small) == str(SIZE).encode(), small
        assert grew < BUDGET, f"peak memory grew by {grew / MB:.0f} MB for {SIZE / MB:.0f} MB messages"
    finally:
        await c.close()


# --- any split of either stream gives the same answers ---------------------------------

def _q(sql: str) -> bytes:
    return m.message(FrontendMsg.QUERY, m.cstr(sql))


def _parse(name: str, sql: str) -> bytes:
    return m.message(FrontendMsg.PARSE, m.cstr(name) + m.cstr(sql) + b"\0\0")


def _bind(stmt: str, *values: bytes) -> bytes:
    body = b"\0" + m.cstr(stmt) + b"\0\0" + len(values).to_bytes(2, "big")
    body += b"".join(len(v).to_bytes(4, "big") + v for v in values) + b"\0\0"
    return m.message(FrontendMsg.BIND, body)


_DESCRIBE_PORTAL, _EXECUTE, _SYNC = m.message(FrontendMsg.DESCRIBE, byte(Target.PORTAL) + b"\0"), m.message(FrontendMsg.EXECUTE, b"\0\0\0\0\0"), m.message(FrontendMsg.SYNC)

#: every path of the pooler's framing: named statements (re-prepared, rewritten Binds, a
#: large parameter), unnamed ones, an error in a pipeline, SETs reported and not (asked for
#: after the transaction), big rows and a big query both ways, COPY in, DEALLOCATE
SCRIPT = b"".join([
    _parse("s1", "SELECT $1::text || 'x'"), _bind("s1", b"a"), _DESCRIBE_PORTAL, _EXECUTE, _SYNC,
    _parse("", "SELECT repeat('z', 300000)"), _bind(""), _EXECUTE, _SYNC,
    _bind("nosuch"), _EXECUTE, _SYNC,
    _q("SET application_name = 'split'"),
    _q("SET extra_float_digits = 2"),
    _q("SELECT current_setting('extra_float_digits'), current_setting('application_name')"),
    _q("SELECT length('" + "q" * 200_000 + "')"),
    _bind("s1", b"b" * 100_000), _EXECUTE, _SYNC,
    _q("COPY c FROM STDIN"), m.message(FrontendMsg.COPY_DATA, b"line one\n"), m.message(FrontendMsg.COPY_DATA, b"w" * 150_000 + b"\n"), m.message(FrontendMsg.COPY_DONE),
    _q("DEALLOCATE ALL"),
    _bind("s1", b"c"), _EXECUTE, m.message(FrontendMsg.CLOSE, b"Ss1\0"), _SYNC,
    _q("SELECT 'end'"),
])
READIES = 12


async def _replies(c: RawClient, readies: int) -> bytes:
    got = []
    while readies:
        head = await c.reader.readexactly(5)
        got.append(head + await c.reader.readexactly(int.from_bytes(head[1:], "big") - 4))
        readies -= head[0] == BackendMsg.READY_FOR_QUERY
    return b"".join(got)


@pytest.fixture(scope="module")
def split_env():
    """A module-scoped fleet (hypothesis calls the test many times): a database with a
    pool of one server connection, and the answers to SCRIPT sent in one piece."""
    from .conftest import fleet_on_own_loop

    with fleet_on_own_loop("pgfleet-split-") as (loop, fleet):
        async def setup():
            server = ProxyServer(fleet, "127.0.0.1", 0, mode="transaction")
            await server.start()
            created = await fleet.create("split", pool_size=1)
            c = await RawClient.connect(server.port, "split", created.password)
            await c.query("CREATE TABLE c(s text)")
            c.writer.write(SCRIPT)
            reference = await _replies(c, READIES)
            await c.close()
            # what the script does, whole: the reference is right
            for expected in (b"SELECT 1\0", b"axC", b"\0\x04\x93\xe0" + b"z" * 16, b"prepared statement \"nosuch\"",
                             b"S\0\0\0\x1bapplication_name\0split\0", b"\0\0\0\x012\0\0\0\x05split",
                             b"\0\0\0\x06200000", b"\0\x01\x86\xa1" + b"b" * 16, b"COPY 2\0", b"DEALLOCATE ALL\0",
                             b'prepared statement "s1" does not exist', b"\0\0\0\x03end"):
                assert expected in reference, expected
            return server, created.password, reference

        server, password, reference = loop.run_until_complete(setup())
        yield loop, server, password, reference

        async def teardown():
            await server.close()
            await fleet.delete("split")

        loop.run_until_complete(teardown())


_PIECES = st.lists(st.one_of(st.integers(1, 6), st.integers(7, 400), st.integers(401, 120_000)),
                   min_size=1, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(client_pieces=_PIECES, server_pieces=_PIECES)
def test_any_split_of_either_stream_gives_the_same_answers(split_env, client_pieces, server_pieces):
    """Whatever reads the proxy gets, on either side (cut here into pieces of the drawn sizes,
    in turn, on top of what TCP does), the client gets the same bytes as when nothing is cut."""
    loop, server, password, reference = split_env
    from pgfleet.proxy import pool as pool_mod
    from pgfleet.proxy.pooled_client import PooledClient

    def cutting(original, sizes):
        turn = [0]

        def data_received(self, data: bytes) -> None:
            pos = 0
            while pos < len(data) and self.transport is not None and not self.transport.is_closing():
                n = sizes[turn[0] % len(sizes)]
                turn[0] += 1
                original(self, data[pos : pos + n])
                pos += n
        return data_received

    async def attempt():
        c = await RawClient.connect(server.port, "split", password)
        client_in, server_in = PooledClient.data_received, pool_mod.ServerConn.data_received
        PooledClient.data_received = cutting(client_in, client_pieces)
        pool_mod.ServerConn.data_received = cutting(server_in, server_pieces)
        try:
            c.writer.write(SCRIPT)
            return await _replies(c, READIES)
        finally:
            PooledClient.data_received, pool_mod.ServerConn.data_received = client_in, server_in
            await c.close()

    got = loop.run_until_complete(asyncio.wait_for(attempt(), 60))
    assert got == reference


_KINDS = st.sampled_from(list(b"QPBDCEHSdcfFX") + [0, 0x70, 0xFF])
#: bodies that mean something for some kind: the random ones mostly do not
_BODIES = st.sampled_from([
    b"BEGIN\0", b"SET search_path = nowhere\0", b"SET TimeZone = 'UTC'\0", b"COPY c FROM STDIN\0", b"SELECT 1\0",
    b"DISCARD ALL\0", b"s1\0SELECT 1\0\0\0", b"\0SELECT 1\0\0\0", b"\0s1\0\0\0\0\0\0\0", b"\0\0\0\0\0\0\0\0",
    b"Ss1\0", b"P\0", b"\0\0\0\0\0", b"",
])
_HOSTILE = st.lists(st.tuples(_KINDS, st.one_of(st.binary(max_size=300), _BODIES), st.integers(0, 3)),
                    min_size=1, max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(messages=_HOSTILE, pieces=_PIECES)
def test_malformed_messages_never_break_the_pooler(split_env, messages, pieces):
    """Well-framed messages of every kind with random bodies (and some lengths that lie),
    cut anywhere: the session may end, nothing in the proxy fails, the next client is served."""
    import logging

    loop, server, password, _ = split_env
    from pgfleet.proxy.pooled_client import PooledClient

    failures: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                failures.append(record)

    stream = b""
    for kind, body, lie in messages:
        length = len(body) + 4 + (0 if lie < 3 else 1 << 20)  # now and then a length the bytes never fill
        stream += bytes((kind,)) + length.to_bytes(4, "big") + body

    async def attack_then_query():
        c = await RawClient.connect(server.port, "split", password)
        original = PooledClient.data_received

        def cut(self, data):
            pos, turn = 0, 0
            while pos < len(data) and self.transport is not None and not self.transport.is_closing():
                n = pieces[turn % len(pieces)]
                original(self, data[pos : pos + n])
                pos, turn = pos + n, turn + 1

        PooledClient.data_received = cut
        try:
            c.writer.write(stream)
            await c.writer.drain()
        finally:
            PooledClient.data_received = original
            c.writer.close()
        other = await RawClient.connect(server.port, "split", password)
        _, small = await other.query("SELECT 'still serving'")
        await other.close()
        return _first_value(small)

    handler = Catch()
    for name in ("asyncio", "pgfleet"):
        logging.getLogger(name).addHandler(handler)
    try:
        assert loop.run_until_complete(asyncio.wait_for(attack_then_query(), 30)) == b"still serving"
    finally:
        for name in ("asyncio", "pgfleet"):
            logging.getLogger(name).removeHandler(handler)
    assert not failures, [r.getMessage() for r in failures]
