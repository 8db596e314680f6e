"""pgwire.framing: messages split at every byte boundary frame the same."""

from __future__ import annotations

import asyncio

import pytest

from pgfleet.pgwire.framing import Framer, ProtocolError, check_length, message, read_message
from pgfleet.pgwire.protocol import BackendMsg, FrontendMsg

STREAM = [
    (BackendMsg.ROW_DESCRIPTION, b"\0\x01a\0" + bytes(18)),
    (BackendMsg.DATA_ROW, b"\0\x01\0\0\0\x011"),
    (BackendMsg.COMMAND_COMPLETE, b"SELECT 1\0"),
    (BackendMsg.NO_DATA, b""),
    (BackendMsg.READY_FOR_QUERY, b"I"),
]
RAW = b"".join(message(k, b) for k, b in STREAM)


def _splits(data: bytes):
    """Every way of cutting `data` in two, and in three at a few places."""
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]
    for i in range(0, len(data), 7):
        for j in range(i, len(data), 5):
            yield [data[:i], data[i:j], data[j:]]


def test_message_is_type_length_body():
    assert message(FrontendMsg.QUERY, b"x\0") == b"Q\0\0\0\x06x\0"
    assert message(FrontendMsg.SYNC) == b"S\0\0\0\x04"


@pytest.mark.parametrize("length", [0, 3, (1 << 30) + 1])
def test_lengths_outside_the_bounds_are_protocol_errors(length):
    with pytest.raises(ProtocolError):
        check_length(FrontendMsg.QUERY, length)


def test_messages_whole_in_any_split():
    for parts in _splits(RAW):
        framer = Framer()
        got = [msg for part in parts for msg in framer.messages(part)]
        assert got == STREAM, parts
        assert framer.between


def test_messages_refuses_what_is_longer_than_its_limit():
    framer = Framer(max_length=16)
    with pytest.raises(ProtocolError):
        framer.messages(message(BackendMsg.DATA_ROW, bytes(100)))


def test_headers_see_every_message_once_and_skip_the_bodies():
    for parts in _splits(RAW):
        framer = Framer()
        kinds, passed = [], 0
        for part in parts:
            passing, rest = framer.resume(part)
            passed += len(passing)
            kinds += [kind for kind, _, _ in framer.headers(rest)]
        assert kinds == [k for k, _ in STREAM], parts
        assert framer.between


def test_resume_hands_back_the_rest_of_a_message_in_flight():
    framer = Framer()
    big = message(BackendMsg.DATA_ROW, bytes(100))
    assert [k for k, _, _ in framer.headers(big[:20])] == [BackendMsg.DATA_ROW]
    assert framer.skip == len(big) - 20
    passing, rest = framer.resume(big[20:] + RAW[:3])
    assert passing == big[20:] and rest == RAW[:3] and framer.skip == 0


def test_gather_returns_the_message_and_what_follows():
    framer = Framer()
    msg = message(FrontendMsg.PARSE, b"s1\0SELECT 1\0\0\0")
    framer.start_whole(msg[:6], 0, len(msg))
    assert framer.gather(msg[6:10]) == (None, b"")
    whole, rest = framer.gather(msg[10:] + b"tail")
    assert bytes(whole) == msg and rest == b"tail" and framer.whole is None


async def test_read_message_from_a_stream():
    reader = asyncio.StreamReader()
    reader.feed_data(RAW)
    assert [await read_message(reader) for _ in STREAM] == STREAM
    reader.feed_data(b"Z\0\0\0\x02")
    with pytest.raises(ProtocolError):
        await read_message(reader)
