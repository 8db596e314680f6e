"""proxy.scanners: what the session relay learns from a stream, however it is split."""

from __future__ import annotations

from pgfleet.pgwire.framing import message
from pgfleet.pgwire.protocol import BackendMsg, FrontendMsg
from pgfleet.proxy.scanners import ClientScanner, ServerScanner

SERVER = b"".join([
    message(BackendMsg.COMMAND_COMPLETE, b"BEGIN\0"), message(BackendMsg.READY_FOR_QUERY, b"T"),
    message(BackendMsg.DATA_ROW, bytes(40)), message(BackendMsg.READY_FOR_QUERY, b"E"),
    message(BackendMsg.NOTICE_RESPONSE, b"Mhi\0\0"), message(BackendMsg.READY_FOR_QUERY, b"I"),
])
CLIENT = b"".join([
    message(FrontendMsg.QUERY, b"BEGIN\0"), message(FrontendMsg.PARSE, b"\0SELECT 1\0\0\0"),
    message(FrontendMsg.BIND, bytes(8)), message(FrontendMsg.EXECUTE, bytes(5)), message(FrontendMsg.SYNC),
    message(FrontendMsg.COPY_DATA, b"S" * 30), message(FrontendMsg.FUNCTION_CALL, bytes(12)),
    message(FrontendMsg.TERMINATE),
])


def _cuts(data: bytes):
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1, 3):
            yield [data[:i], data[i:j], data[j:]]


def test_server_scanner_finds_every_ready_for_query_status():
    for parts in _cuts(SERVER):
        scanner = ServerScanner()
        assert [s for p in parts for s in scanner.feed(p)] == list(b"TEI"), parts


def test_client_scanner_counts_the_messages_that_end_in_ready_for_query():
    for parts in _cuts(CLIENT):
        scanner = ClientScanner()
        assert sum(scanner.feed(p) for p in parts) == 3, parts  # Query, Sync, FunctionCall
