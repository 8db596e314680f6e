"""Framing of v3 protocol byte streams: the one place that knows a message is a type byte,
a 4-byte length that counts itself, and a body.

- `read_message`: one whole message from an asyncio StreamReader (startup, authentication,
  the admin client).
- `Framer`: one direction of a stream fed read by read (asyncio Protocols: the pooler, the
  relay's scanners, the proxy's own exchanges). It carries across reads what a read leaves
  unfinished: the bytes of a message still to pass, a partial header, or a message being
  gathered whole; `messages()` splits a stream into whole messages, `headers()` walks the
  headers of what passes without copying it.

The pooler's walkers (proxy/pool.py) walk a read's headers in their own loops, the hot path
of transaction pooling, and keep in a Framer whatever a read leaves over.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Iterator

from .protocol import byte

#: regular messages can be large (COPY data, big queries); PostgreSQL itself allows up to 1 GB
MAX_MESSAGE_LENGTH = 1 << 30
#: a message the proxy must hold whole to understand (a named Parse it re-prepares, a server's
#: startup reply, the answer to its own query): anything longer is refused, not buffered
MAX_READ_WHOLE = 1 << 20
#: type byte and length word
HEADER_SIZE = 5

_HEADER = struct.Struct("!Bi")  # type byte, length (itself included, the type not)
_from_bytes = int.from_bytes


class ProtocolError(Exception):
    """The peer sent something that is not valid protocol; the connection must end."""


def message(kind: int, body: bytes = b"") -> bytes:
    """One message: its type (a FrontendMsg or BackendMsg member), length and body."""
    return _HEADER.pack(kind, len(body) + 4) + body


def check_length(kind: int, length: int, max_length: int = MAX_MESSAGE_LENGTH) -> None:
    """A message's length word: at least itself, at most `max_length`."""
    if length < 4 or length > max_length:
        raise ProtocolError(f"invalid message length {length} for {byte(kind)!r}")


async def read_message(
    reader: asyncio.StreamReader, max_length: int = MAX_MESSAGE_LENGTH
) -> tuple[int, bytes]:
    """Read one regular message; returns (type, body): the type as an int (protocol.py)."""
    kind, length = _HEADER.unpack(await reader.readexactly(HEADER_SIZE))
    check_length(kind, length, max_length)
    return kind, await reader.readexactly(length - 4)


class Framer:
    """What one direction of a stream carries from one read to the next.

    - `skip`: bytes of the current message still to come, passed on (or dropped: `drop`) as
      they arrive: a walker that met a header whose message ends past its read sets it.
    - `head`: the start of a message too short to decide on (less than a header, or less
      than the walker needs to look at), put in front of the next read.
    - `whole`: a message the walker reads whole, being gathered (`whole_len` bytes in all).
    """

    __slots__ = ("skip", "drop", "head", "whole", "whole_len", "max_length")

    def __init__(self, max_length: int = MAX_MESSAGE_LENGTH) -> None:
        self.skip = 0
        self.drop = False
        self.head = b""
        self.whole: bytearray | None = None
        self.whole_len = 0
        self.max_length = max_length

    @property
    def between(self) -> bool:
        """At a message boundary: nothing carried."""
        return not self.skip and not self.head and self.whole is None

    def resume(self, data: bytes) -> tuple[bytes, bytes]:
        """Split a read (not while gathering) into the rest of the message in flight and what
        follows it, with a carried partial header put back in front."""
        n = self.skip
        if n:
            if n >= len(data):
                self.skip = n - len(data)
                return data, b""
            self.skip = 0
            return data[:n], data[n:]
        if self.head:
            data, self.head = self.head + data, b""
        return b"", data

    def finish(self, data: bytes, run: int, pos: int, out: list[bytes]) -> None:
        """The end of a walker's pass over `data`: the run of messages passed on as they
        came (`data[run:pos]`) joins `out`; the bytes from `pos`, not yet decided on, are
        carried to the next read."""
        if run < pos:
            out.append(data[run:pos])
        if pos < len(data):
            self.head = data[pos:]

    def start_whole(self, data: bytes, pos: int, mend: int) -> None:
        """Gather the message at `pos` (ending at `mend`, past this read) whole."""
        self.whole = bytearray(data[pos:])
        self.whole_len = mend - pos

    def gather(self, data: bytes) -> tuple[bytearray | None, bytes]:
        """Add a read to the message being gathered: (the whole message, what follows it)
        once it is complete, else (None, b"")."""
        buf = self.whole
        assert buf is not None
        need = self.whole_len - len(buf)
        if need > len(data):
            buf += data
            return None, b""
        buf += data[:need]
        self.whole, self.whole_len = None, 0
        return buf, data[need:]

    def headers(self, data: bytes) -> Iterator[tuple[int, int, int]]:
        """The messages that start in `data` (after `resume`): (type, body start, end) each,
        their end possibly past the read (the rest is skipped as it arrives)."""
        pos, end = 0, len(data)
        while end - pos >= HEADER_SIZE:
            kind = data[pos]
            length = _from_bytes(data[pos + 1 : pos + 5], "big")
            check_length(kind, length, self.max_length)
            mend = pos + 1 + length
            yield kind, pos + HEADER_SIZE, mend
            if mend > end:
                self.skip = mend - end
                return
            pos = mend
        if pos < end:
            self.head = data[pos:]

    def messages(self, data: bytes) -> list[tuple[int, bytes]]:
        """The whole messages a read completes, as (type, body); a message that does not
        end in it is gathered (up to `max_length`: longer ones are a ProtocolError)."""
        out: list[tuple[int, bytes]] = []
        if self.whole is not None:
            buf, data = self.gather(data)
            if buf is None:
                return out
            out.append((buf[0], bytes(memoryview(buf)[HEADER_SIZE:])))
        else:
            _, data = self.resume(data)
        end = len(data)
        for kind, start, mend in self.headers(data):
            if mend > end:
                self.start_whole(data, start - HEADER_SIZE, mend)
                break
            out.append((kind, data[start:mend]))
        return out
