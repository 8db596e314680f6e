"""Session-mode relay: one client connection bound to one server connection for its life.

Bytes are forwarded as they arrive (asyncio Protocols, no per-message copies). Where the
driver keeps sessions across a suspend (microVM), headers are scanned on the way to know
whether the session is busy (a query or a transaction open), so that an `idle`-policy
database is never scaled to zero mid-transaction and a suspended one wakes on the next
packet. Elsewhere an open session alone keeps its database up, so the relay does nothing
per read but forward (`track=False`): the session counts as busy for its whole life.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from pgfleet.pgwire.protocol import TransactionStatus

from .scanners import ClientScanner, ServerScanner

HIGH_WATER = 256 * 1024
_IDLE = int(TransactionStatus.IDLE)


class SessionActivity:
    """What a relay reports: busy/idle edges and liveness."""

    def __init__(self, on_busy: Callable[[bool], None], before_forward: Callable[[], "asyncio.Future | None"]):
        self.on_busy = on_busy
        # returns None when the backend is up, else a future that completes when it is
        # (an `idle`-policy database suspended under open sessions wakes on their next packet)
        self.before_forward = before_forward


class _Side(asyncio.Protocol):
    __slots__ = ("relay", "transport", "peer", "count")

    def __init__(self, relay: "Relay") -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.peer: "_Side | None" = None
        self.count = 0  # bytes read from this side (metrics: a plain int, read on a scrape)

    def pause_writing(self) -> None:  # our transport is full: stop reading the other side
        if self.peer and self.peer.transport:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer and self.peer.transport:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.close()

    def eof_received(self) -> bool:
        self.relay.close()
        return False


class _ClientSide(_Side):
    def data_received(self, data: bytes) -> None:
        self.count += len(data)
        self.relay.from_client(data)


class _ServerSide(_Side):
    def data_received(self, data: bytes) -> None:
        self.count += len(data)
        self.relay.from_server(data)


class _PlainSide(_Side):
    """Forwards without looking: the cheapest path a relay in Python can take."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        self.count += len(data)
        self.peer.transport.write(data)  # type: ignore[union-attr]


class Relay:
    """Wires a client transport to a server transport. `done` resolves when either ends."""

    def __init__(self, client: asyncio.Transport, server: asyncio.Transport, activity: SessionActivity,
                 track: bool = True) -> None:
        self.track = track
        self.client_side: _Side = _ClientSide(self) if track else _PlainSide(self)
        self.server_side: _Side = _ServerSide(self) if track else _PlainSide(self)
        self.client_side.transport, self.server_side.transport = client, server
        self.client_side.peer, self.server_side.peer = self.server_side, self.client_side
        self.cscan = ClientScanner()
        self.sscan = ServerScanner()
        self.pending = 0  # ReadyForQuery messages the server still owes
        self.in_tx = False
        self.busy = False
        self.activity = activity
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self._held: list[bytes] | None = None
        for side in (self.client_side, self.server_side):
            side.transport.set_protocol(side)  # type: ignore[union-attr]
            side.transport.set_write_buffer_limits(high=HIGH_WATER)  # type: ignore[union-attr]

    def start(self, client_leftover: bytes = b"", server_leftover: bytes = b"") -> None:
        if not self.track:
            self.busy = True
            self.activity.on_busy(True)
            if server_leftover:
                self.client_side.transport.write(server_leftover)  # type: ignore[union-attr]
            if client_leftover:
                self.server_side.transport.write(client_leftover)  # type: ignore[union-attr]
            for side in (self.client_side, self.server_side):
                side.transport.resume_reading()  # type: ignore[union-attr]
            return
        if server_leftover:
            self.from_server(server_leftover)
        if client_leftover:
            self.from_client(client_leftover)
        for side in (self.client_side, self.server_side):
            side.transport.resume_reading()  # type: ignore[union-attr]

    def from_client(self, data: bytes) -> None:
        self.pending += self.cscan.feed(data)
        self._update_busy()
        if self._held is not None:
            self._held.append(data)
            return
        waiting = self.activity.before_forward()
        if waiting is not None:
            self._held = [data]
            self.client_side.transport.pause_reading()  # type: ignore[union-attr]
            waiting.add_done_callback(self._release_held)
            return
        self.server_side.transport.write(data)  # type: ignore[union-attr]

    def _release_held(self, fut: asyncio.Future) -> None:
        held, self._held = self._held or [], None
        if fut.cancelled() or fut.exception() is not None:
            self.close()
            return
        if not self.done.done():
            self.server_side.transport.write(b"".join(held))  # type: ignore[union-attr]
            self.client_side.transport.resume_reading()  # type: ignore[union-attr]

    def from_server(self, data: bytes) -> None:
        statuses = self.sscan.feed(data)
        if statuses:
            self.pending = max(0, self.pending - len(statuses))
            self.in_tx = statuses[-1] != _IDLE
            self._update_busy()
        self.client_side.transport.write(data)  # type: ignore[union-attr]

    def _update_busy(self) -> None:
        busy = self.pending > 0 or self.in_tx
        if busy != self.busy:
            self.busy = busy
            self.activity.on_busy(busy)

    def close(self) -> None:
        if self.done.done():
            return
        if self.busy:
            self.busy = False
            self.activity.on_busy(False)
        for side in (self.client_side, self.server_side):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()
        self.done.set_result(None)
