"""proxy.pool's walkers over in-memory transports (no Postgres): a client's messages reach
the server connection, and the server's answers the client, whatever the reads' splits;
named statements are rewritten and re-prepared; the connection goes back to the pool when
the transaction is done."""

from __future__ import annotations

import pytest

from pgfleet.pgwire.framing import Framer, message
from pgfleet.pgwire.protocol import BackendMsg, FrontendMsg
from pgfleet.proxy.client_state import ClientPhase
from pgfleet.proxy.pool import Pool, ServerConn
from pgfleet.proxy.pooled_client import PooledClient
from pgfleet.proxy.statements import server_statement_name
from tests.fakes import FakeTransport


def _cuts(data: bytes, step: int = 1):
    yield [data]
    for i in range(1, len(data), step):
        yield [data[:i], data[i:]]


def _pool() -> tuple[Pool, ServerConn]:
    async def no_backend():
        raise AssertionError("the test's pool opens no connection")

    pool = Pool("db", "role", 1, no_backend)
    conn = ServerConn(pool)
    conn.transport = FakeTransport()  # type: ignore[assignment]
    pool.conns.add(conn)
    pool.idle.append(conn)
    return pool, conn


def _client(pool: Pool) -> tuple[PooledClient, FakeTransport]:
    transport = FakeTransport()
    client = PooledClient(pool, transport, lambda busy: None)  # type: ignore[arg-type]
    client.start()
    return client, transport


def _q(sql: str) -> bytes:
    return message(FrontendMsg.QUERY, sql.encode() + b"\0")


ANSWER = b"".join([
    message(BackendMsg.ROW_DESCRIPTION, b"\0\x01a\0" + bytes(18)),
    message(BackendMsg.DATA_ROW, b"\0\x01\0\0\0\x011"),
    message(BackendMsg.COMMAND_COMPLETE, b"SELECT 1\0"),
    message(BackendMsg.READY_FOR_QUERY, b"I"),
])


async def test_a_query_and_its_answer_pass_unchanged_in_any_split():
    request = _q("SELECT 1") + _q("SELECT 2")
    answers = ANSWER + ANSWER
    for c_parts in _cuts(request, 3):
        for s_parts in _cuts(answers, 5):
            pool, conn = _pool()
            client, to_client = _client(pool)
            for part in c_parts:
                client.data_received(part)
            assert conn.transport.take() == request  # type: ignore[union-attr]
            assert client.server is conn and not pool.idle
            for part in s_parts:
                conn.data_received(part)
            assert to_client.take() == answers
            assert client.server is None and list(pool.idle) == [conn], (c_parts, s_parts)


async def test_a_transaction_keeps_its_connection_until_it_ends():
    pool, conn = _pool()
    client, to_client = _client(pool)
    client.data_received(_q("BEGIN"))
    conn.data_received(message(BackendMsg.COMMAND_COMPLETE, b"BEGIN\0") + message(BackendMsg.READY_FOR_QUERY, b"T"))
    assert client.in_tx and client.server is conn and not pool.idle
    client.data_received(_q("COMMIT"))
    conn.data_received(message(BackendMsg.COMMAND_COMPLETE, b"COMMIT\0") + message(BackendMsg.READY_FOR_QUERY, b"I"))
    assert not client.in_tx and client.server is None and list(pool.idle) == [conn]


def _parse(name: bytes, sql: bytes) -> bytes:
    return message(FrontendMsg.PARSE, name + b"\0" + sql + b"\0\0\0")


def _bind(name: bytes) -> bytes:
    return message(FrontendMsg.BIND, b"\0" + name + b"\0\0\0\0\0\0\0")


EXECUTE, SYNC = message(FrontendMsg.EXECUTE, b"\0\0\0\0\0"), message(FrontendMsg.SYNC)
PREPARED = b"".join([message(BackendMsg.PARSE_COMPLETE), message(BackendMsg.BIND_COMPLETE),
                     message(BackendMsg.DATA_ROW, b"\0\x01\0\0\0\x011"),
                     message(BackendMsg.COMMAND_COMPLETE, b"SELECT 1\0"), message(BackendMsg.READY_FOR_QUERY, b"I")])


def _server_messages(data: bytes) -> list[tuple[int, bytes]]:
    return Framer().messages(data)


@pytest.mark.parametrize("split", [1, 7])
async def test_named_statements_take_the_server_name_and_are_prepared_where_missing(split):
    pool, conn = _pool()
    sname = server_statement_name(b"SELECT 1\0\0\0").encode()
    first, to_first = _client(pool)
    request = _parse(b"s1", b"SELECT 1") + _bind(b"s1") + EXECUTE + SYNC
    first.data_received(request[:split])
    first.data_received(request[split:])
    sent = _server_messages(conn.transport.take())  # type: ignore[union-attr]
    assert [k for k, _ in sent] == [FrontendMsg.PARSE, FrontendMsg.BIND, FrontendMsg.EXECUTE, FrontendMsg.SYNC]
    assert sent[0][1].startswith(sname + b"\0") and sent[1][1].startswith(b"\0" + sname + b"\0")
    conn.data_received(PREPARED)
    assert to_first.take() == PREPARED and list(pool.idle) == [conn]

    # a second client prepares the same text under its own name: the server has it already,
    # so the proxy answers the Parse itself, in order
    second, to_second = _client(pool)
    second.data_received(_parse(b"mine", b"SELECT 1") + _bind(b"mine") + EXECUTE + SYNC)
    sent = _server_messages(conn.transport.take())  # type: ignore[union-attr]
    assert [k for k, _ in sent] == [FrontendMsg.BIND, FrontendMsg.EXECUTE, FrontendMsg.SYNC]
    conn.data_received(PREPARED[len(message(BackendMsg.PARSE_COMPLETE)):])
    assert to_second.take() == PREPARED


async def test_a_statement_the_connection_lacks_is_prepared_and_its_answer_dropped():
    pool, conn = _pool()
    client, to_client = _client(pool)
    client.data_received(_parse(b"s1", b"SELECT 1") + SYNC)
    conn.transport.take()  # type: ignore[union-attr]
    conn.data_received(message(BackendMsg.PARSE_COMPLETE) + message(BackendMsg.READY_FOR_QUERY, b"I"))
    to_client.take()
    conn.prepared.clear()  # as if the client landed on another connection
    client.data_received(_bind(b"s1") + EXECUTE + SYNC)
    sent = _server_messages(conn.transport.take())  # type: ignore[union-attr]
    assert [k for k, _ in sent] == [FrontendMsg.PARSE, FrontendMsg.BIND, FrontendMsg.EXECUTE, FrontendMsg.SYNC]
    conn.data_received(PREPARED)
    assert to_client.take() == PREPARED[len(message(BackendMsg.PARSE_COMPLETE)):]


async def test_an_invalid_length_ends_the_session_with_a_protocol_error():
    pool, conn = _pool()
    client, to_client = _client(pool)
    client.data_received(b"Q\0\0\0\x02")
    fields = dict(_server_messages(to_client.take()))
    assert b"08P01" in fields[BackendMsg.ERROR_RESPONSE]
    assert client.done.done()


async def test_a_client_waits_for_the_connection_another_releases():
    pool, conn = _pool()
    first, _ = _client(pool)
    second, to_second = _client(pool)
    assert first.phase is ClientPhase.IDLE
    first.data_received(_q("BEGIN"))
    conn.data_received(message(BackendMsg.COMMAND_COMPLETE, b"BEGIN\0") + message(BackendMsg.READY_FOR_QUERY, b"T"))
    assert first.phase is ClientPhase.ATTACHED
    second.data_received(_q("SELECT 1"))  # the pool's one connection is in use
    assert second.phase is ClientPhase.WAITING and list(pool.queued) == [second]
    conn.transport.take()  # type: ignore[union-attr]
    first.data_received(_q("COMMIT"))
    conn.data_received(message(BackendMsg.COMMAND_COMPLETE, b"COMMIT\0") + message(BackendMsg.READY_FOR_QUERY, b"I"))
    assert first.phase is ClientPhase.IDLE
    assert second.phase is ClientPhase.ATTACHED and second.server is conn
    assert conn.transport.take() == _q("COMMIT") + _q("SELECT 1")  # type: ignore[union-attr]
    conn.data_received(ANSWER)
    assert to_second.take() == ANSWER and second.phase is ClientPhase.IDLE
    second.close()
    assert second.phase is ClientPhase.CLOSED and second.done.done()
