"""pgfleet.edge.http: which requests its parser takes, and which it leaves to aiohttp."""

from __future__ import annotations

import pytest

from pgfleet.edge import http


@pytest.fixture
def conn() -> http.HttpConnection:
    c = http.HttpConnection.__new__(http.HttpConnection)  # the parser reads no connection state
    c.remote, c.transport = "127.0.0.1", None
    return c


def test_takes_the_common_request(conn):
    head = (b"POST /sql?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nNeon-Connection-String: \t postgresql://a:b@c/d "
            b"\r\nConnection: close")
    request = conn._parse(head, 99)
    assert (request.method, request.path, request.length, request.start) == ("POST", "/sql", 5, 99)
    assert request.headers["neon-connection-string"] == "postgresql://a:b@c/d"
    assert request.keep_alive is False
    assert conn._parse(b"OPTIONS /sql HTTP/1.1\r\nHost: x", 0).length == 0


@pytest.mark.parametrize("head", [
    b"GET /sql HTTP/1.1\r\nHost: x",  # another method (a WebSocket upgrade is a GET)
    b"POST /sql HTTP/1.0\r\nHost: x",
    b"POST /sql HTTP/1.1\r\nTransfer-Encoding: chunked",
    b"POST /sql HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked",
    b"POST /sql HTTP/1.1\r\nExpect: 100-continue",
    b"POST /sql HTTP/1.1\r\nUpgrade: websocket",
    b"POST /sql HTTP/1.1\r\nContent-Length: 1\r\ncontent-length: 2",  # a header twice
    b"POST /sql HTTP/1.1\r\nContent-Length: -1",
    b"POST /sql HTTP/1.1\r\nContent-Length: 1e3",
    b"POST /sql HTTP/1.1\r\nContent-Length: 99999999999999999999",
    b"POST /sql HTTP/1.1\r\nHo st: x",
    b"POST /sql HTTP/1.1\r\n: x",
    b"POST /sql HTTP/1.1\r\nHost x",
    b"POST /sql HTTP/1.1\r\n Host: x",  # folded
    b"POST /sql HTTP/1.1\r\nHost: x\ny: z",  # a bare LF
    b"POST /sql HTTP/1.1\r\nHost: x\rY: z",  # a bare CR
    b"POST /sql HTTP/1.1\r\nHost: x\0",
    b"POST /s%71l HTTP/1.1\r\nHost: x",
    b"POST sql HTTP/1.1\r\nHost: x",
    b"POST  /sql HTTP/1.1\r\nHost: x",
    b"POST /sql HTTP/1.1\r\n" + b"\r\n".join(b"X-%d: y" % i for i in range(http.MAX_HEADERS + 1)),
])
def test_leaves_the_rest_to_aiohttp(conn, head):
    assert conn._parse(head, 0) is None


def test_answers_are_http_1_1_with_a_length():
    out = http._serialise(http.Answer(400, b'{"message":"x"}', {"Access-Control-Allow-Origin": "*"}), False)
    assert out == (b"HTTP/1.1 400 Bad Request\r\nAccess-Control-Allow-Origin: *\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 15\r\nConnection: close\r\n\r\n{\"message\":\"x\"}")
    assert http._serialise(http.Answer(204, b"", {}), True) == b"HTTP/1.1 204 No Content\r\n\r\n"
