"""What the session relay learns from the streams it forwards, without copying them: the
client messages that each make the server answer with one ReadyForQuery, and those
ReadyForQuery messages with their transaction status. Framing is pgwire's (Framer).
"""

from __future__ import annotations

from pgfleet.pgwire.framing import Framer
from pgfleet.pgwire.protocol import BackendMsg, FrontendMsg, kinds

#: client messages that each make the server answer with exactly one ReadyForQuery
SYNC_POINTS = kinds(FrontendMsg.QUERY, FrontendMsg.SYNC, FrontendMsg.FUNCTION_CALL)


class ServerScanner:
    """Finds ReadyForQuery messages (and their transaction status) in server output."""

    __slots__ = ("_frame", "_want_status")

    def __init__(self) -> None:
        self._frame = Framer()
        self._want_status = False  # a ReadyForQuery's status byte is the next byte to come

    def feed(self, data: bytes) -> list[int]:
        """The status bytes (ord of I/T/E) of every ReadyForQuery completed in `data`."""
        statuses: list[int] = []
        passing, data = self._frame.resume(data)
        if self._want_status and passing:
            statuses.append(passing[0])
            self._want_status = False
        end = len(data)
        for kind, start, _ in self._frame.headers(data):
            if kind == BackendMsg.READY_FOR_QUERY:
                if start < end:
                    statuses.append(data[start])
                else:
                    self._want_status = True
        return statuses


class ClientScanner:
    """Counts the client messages that expect a ReadyForQuery."""

    __slots__ = ("_frame",)

    def __init__(self) -> None:
        self._frame = Framer()

    def feed(self, data: bytes) -> int:
        _, data = self._frame.resume(data)
        return sum(1 for kind, _, _ in self._frame.headers(data) if kind in SYNC_POINTS)
