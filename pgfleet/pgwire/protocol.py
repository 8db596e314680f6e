"""The v3 protocol's vocabulary: message type bytes per direction, and the one-byte codes
inside messages. The same byte means different messages in the two directions (0x45 'E' is
Execute from a client and ErrorResponse from a server), so each direction has its own enum.

Members are ints (a message's first byte read from a buffer is an int), so they compare and
hash as the byte itself: `data[pos] == BackendMsg.READY_FOR_QUERY`, `kind in frozenset({...})`.
Hot loops bind the members they test to module globals (an enum attribute lookup costs more
than a global's) and say so where they do.

Reference: https://www.postgresql.org/docs/15/protocol-message-formats.html
(PgBouncer keeps the same list in include/common/protocol.h.)
"""

from __future__ import annotations

import enum


class FrontendMsg(enum.IntEnum):
    """Messages a client sends (after the startup packet, which has no type byte)."""

    BIND = ord("B")
    CLOSE = ord("C")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_FAIL = ord("f")
    DESCRIBE = ord("D")
    EXECUTE = ord("E")
    FLUSH = ord("H")
    FUNCTION_CALL = ord("F")
    PARSE = ord("P")
    #: PasswordMessage, SASLInitialResponse and SASLResponse share it (told apart by context)
    PASSWORD = ord("p")
    QUERY = ord("Q")
    SYNC = ord("S")
    TERMINATE = ord("X")


class BackendMsg(enum.IntEnum):
    """Messages a server sends."""

    AUTHENTICATION = ord("R")
    BACKEND_KEY_DATA = ord("K")
    BIND_COMPLETE = ord("2")
    CLOSE_COMPLETE = ord("3")
    COMMAND_COMPLETE = ord("C")
    COPY_BOTH_RESPONSE = ord("W")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_IN_RESPONSE = ord("G")
    COPY_OUT_RESPONSE = ord("H")
    DATA_ROW = ord("D")
    EMPTY_QUERY_RESPONSE = ord("I")
    ERROR_RESPONSE = ord("E")
    FUNCTION_CALL_RESPONSE = ord("V")
    NEGOTIATE_PROTOCOL_VERSION = ord("v")
    NO_DATA = ord("n")
    NOTICE_RESPONSE = ord("N")
    NOTIFICATION_RESPONSE = ord("A")
    PARAMETER_DESCRIPTION = ord("t")
    PARAMETER_STATUS = ord("S")
    PARSE_COMPLETE = ord("1")
    PORTAL_SUSPENDED = ord("s")
    READY_FOR_QUERY = ord("Z")
    ROW_DESCRIPTION = ord("T")


class TransactionStatus(enum.IntEnum):
    """The status byte of ReadyForQuery."""

    IDLE = ord("I")
    IN_TRANSACTION = ord("T")
    FAILED = ord("E")


class Target(enum.IntEnum):
    """What a Describe or Close names: a prepared statement or a portal."""

    STATEMENT = ord("S")
    PORTAL = ord("P")


class ErrorField(enum.IntEnum):
    """Field codes of ErrorResponse and NoticeResponse bodies (the ones pgfleet writes)."""

    SEVERITY = ord("S")
    SEVERITY_NONLOCALIZED = ord("V")
    SQLSTATE = ord("C")
    MESSAGE = ord("M")
    DETAIL = ord("D")
    HINT = ord("H")


#: the one-byte answers to an SSLRequest / GSSENCRequest
SSL_ACCEPTED = b"S"
SSL_REFUSED = b"N"


def kinds(*members: int) -> frozenset[int]:
    """Types or codes as a set of plain ints, for the hot loops: a byte read from a buffer
    is a cached small int, which a set of plain ints finds by identity (an IntEnum member
    is another object, found by a slower equality test)."""
    return frozenset(int(k) for k in members)


def byte(kind: int) -> bytes:
    """A type or code as the single byte it is on the wire."""
    return bytes((kind,))
