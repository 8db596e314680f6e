"""Incremental framing of v3 protocol byte streams, without copying what is relayed.

The relay forwards bytes as they arrive; these scanners only walk the message headers to
learn what the stream is doing (query boundaries, transaction status), carrying partial
headers and bodies across reads.
"""

from __future__ import annotations

from pgfleet.pgwire.messages import MAX_MESSAGE_LENGTH, ProtocolError
from pgfleet.pgwire.protocol import BackendMsg, FrontendMsg

#: client messages that each make the server answer with exactly one ReadyForQuery
SYNC_POINTS = frozenset({FrontendMsg.QUERY, FrontendMsg.SYNC, FrontendMsg.FUNCTION_CALL})
#: bound as plain ints for the scanning loops (an enum attribute lookup costs ~6x a global's)
_READY = int(BackendMsg.READY_FOR_QUERY)
_TERMINATE = int(FrontendMsg.TERMINATE)


class ServerScanner:
    """Finds ReadyForQuery messages (and their transaction status) in server output."""

    __slots__ = ("_skip", "_head", "_want_status")

    def __init__(self) -> None:
        self._skip = 0  # body bytes of the current message still to pass
        self._head = b""  # a partial 5-byte header carried to the next read
        self._want_status = False  # the next body byte is a ReadyForQuery status

    def feed(self, data: bytes) -> list[int]:
        """Returns the status bytes (ord of I/T/E) of every ReadyForQuery completed in `data`."""
        statuses: list[int] = []
        pos, end = 0, len(data)
        if self._want_status and end:
            statuses.append(data[0])
            self._want_status = False
        if self._head:
            need = 5 - len(self._head)
            head = self._head + data[:need]
            if len(head) < 5:
                self._head = head
                return statuses
            self._head = b""
            pos = need
            kind, length = head[0], int.from_bytes(head[1:5], "big")
            if length < 4:
                raise ProtocolError("server message length below 4")
            self._skip = length - 4
            if kind == _READY:
                if pos < end:
                    statuses.append(data[pos])
                else:
                    self._want_status = True
        skip = self._skip
        while True:
            pos += skip
            if pos >= end:
                self._skip = pos - end
                return statuses
            if end - pos < 5:
                self._head = data[pos:]
                self._skip = 0
                return statuses
            kind = data[pos]
            length = int.from_bytes(data[pos + 1 : pos + 5], "big")
            if length < 4:
                raise ProtocolError("server message length below 4")
            pos += 5
            skip = length - 4
            if kind == _READY:
                if pos < end:
                    statuses.append(data[pos])
                else:
                    self._want_status = True


class ClientScanner:
    """Counts the client messages that expect a ReadyForQuery, and sees Terminate."""

    __slots__ = ("_skip", "_head", "terminated")

    def __init__(self) -> None:
        self._skip = 0
        self._head = b""
        self.terminated = False

    def feed(self, data: bytes) -> int:
        syncs = 0
        pos, end = 0, len(data)
        if self._head:
            need = 5 - len(self._head)
            head = self._head + data[:need]
            if len(head) < 5:
                self._head = head
                return 0
            self._head = b""
            pos = need
            syncs += self._header(head[0], int.from_bytes(head[1:5], "big"))
        skip = self._skip
        while True:
            pos += skip
            if pos >= end:
                self._skip = pos - end
                return syncs
            if end - pos < 5:
                self._head = data[pos:]
                self._skip = 0
                return syncs
            kind = data[pos]
            length = int.from_bytes(data[pos + 1 : pos + 5], "big")
            syncs += self._header(kind, length)
            skip = self._skip
            pos += 5

    def _header(self, kind: int, length: int) -> int:
        if length < 4 or length > MAX_MESSAGE_LENGTH:
            raise ProtocolError(f"invalid message length {length}")
        self._skip = length - 4
        if kind == _TERMINATE:
            self.terminated = True
        return 1 if kind in SYNC_POINTS else 0


class MessageBuffer:
    """Splits a byte stream into whole (type, body) messages: the answers to the pooled
    mode's own queries on a server connection (small; client traffic streams, pool.py)."""

    __slots__ = ("_buf", "max_length")

    def __init__(self, max_length: int = MAX_MESSAGE_LENGTH) -> None:
        self._buf = bytearray()
        self.max_length = max_length

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[int, bytes]] = []
        pos, end = 0, len(buf)
        while end - pos >= 5:
            length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
            if length < 4 or length > self.max_length:
                raise ProtocolError(f"invalid message length {length}")
            if end - pos < length + 1:
                break
            out.append((buf[pos], bytes(buf[pos + 5 : pos + 1 + length])))
            pos += 1 + length
        del buf[:pos]
        return out

    def __len__(self) -> int:
        return len(self._buf)
