"""The direct listener's sessions: one server session per client, relayed for its life."""

from __future__ import annotations

import asyncio
import struct

from pgfleet.drivers.base import Backend
from pgfleet.fleet.manager import Fleet
from pgfleet.pgwire import messages as m
from pgfleet.pgwire.protocol import BackendMsg
from pgfleet.store import InstanceRow

from . import sessions
from .cancel import CancelRegistry, CancelTarget
from .connect import BackendRefused, open_session
from .errors import ClientError
from .relay import Relay, SessionActivity
from .routing import Route
from .spares import Spares

#: client startup parameters that must not reach the backend as given
NOT_FORWARDED = frozenset({"user", "database", "replication"})


class DirectSessions:
    """The relays of one direct listener, and the bytes of those that ended (metrics)."""

    def __init__(self, fleet: Fleet, cancels: CancelRegistry) -> None:
        self.fleet = fleet
        self.cancels = cancels
        #: live relays by database uuid, and [received, sent] of those that ended
        self.relays: dict[str, set[Relay]] = {}
        self.relayed: dict[str, list[int]] = {}
        #: one session opened ahead per warm database (spares.py)
        self.spares = Spares()

    async def serve(self, startup: m.StartupMessage, route: Route, row: InstanceRow,
                    reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        params = {k: v for k, v in startup.params.items() if k not in NOT_FORWARDED}
        if route.options is not None:
            params["options"] = route.options
        elif "options" in params:
            del params["options"]
        fleet = self.fleet
        with sessions.starting(fleet, row.uuid):
            # frozen (warm standby) since the wake, while the client authenticated: thaw it
            backend = fleet.backend_of(row.uuid) or await asyncio.wait_for(
                sessions.wake(fleet, row.uuid), sessions.WAKE_TIMEOUT_S)
            self.spares.note_client(row.uuid, dict(params))
            # row: the database as the startup packet found it (its start count then)
            spare = self.spares.take(row.uuid, params, row.start_count)
            if spare is not None:
                b_reader, b_writer, replies = spare.reader, spare.writer, spare.replies
            else:
                params.update(user=row.role, database=backend.database)
                try:
                    b_reader, b_writer, replies = await open_session(backend, params, sessions.WAKE_TIMEOUT_S)
                except BackendRefused as exc:  # the database's own error, as it sent it
                    writer.write(m.message(BackendMsg.ERROR_RESPONSE, exc.body))
                    raise ClientError("", "")
            key = self.cancels.mint()
            try:
                writer.write(self._startup_replies(replies, backend, key))
                relay = Relay(writer.transport, b_writer.transport, self._activity(row.uuid),  # type: ignore[arg-type]
                              track=sessions.tracks_transactions(fleet, row))
                relay.start(sessions.take_buffer(reader), sessions.take_buffer(b_reader))
            except BaseException:
                self.cancels.release(key)
                b_writer.close()
                raise
        try:
            await self._relayed(row.uuid, relay)
        finally:
            self.cancels.release(key)
            b_writer.close()

    async def _relayed(self, uuid: str, relay: Relay) -> None:
        live = self.relays.setdefault(uuid, set())
        live.add(relay)
        try:
            await relay.done
        finally:
            live.discard(relay)
            if not live:
                self.relays.pop(uuid, None)
            if self.fleet.is_known(uuid):  # not deleted meanwhile
                done = self.relayed.setdefault(uuid, [0, 0])
                done[0] += relay.client_side.count
                done[1] += relay.server_side.count

    def _startup_replies(self, replies: list[tuple[int, bytes]], backend: Backend, key: tuple[int, int]) -> bytes:
        """The backend's startup replies for the client, with our cancel key swapped in."""
        out = bytearray()
        for kind, body in replies:
            if kind == BackendMsg.BACKEND_KEY_DATA:
                pid, secret = struct.unpack("!ii", body[:8])
                self.cancels.bind(key, CancelTarget(backend, pid, secret))
                out += m.backend_key_data(*key)
            else:
                out += m.message(kind, body)
        return bytes(out)

    def _activity(self, uuid: str) -> SessionActivity:
        fleet = self.fleet

        def before_forward():
            if fleet.is_up(uuid):
                return None
            return asyncio.ensure_future(fleet.ensure_running(uuid))

        return SessionActivity(lambda busy: fleet.session_busy(uuid, busy), before_forward)

    async def open_spare(self, uuid: str, backend: Backend) -> None:
        """Before a freeze (fleet hook): the session the next new client takes (spares.py)."""
        row = self.fleet.get(uuid)
        await self.spares.open(uuid, backend, row.start_count, {"user": row.role, "database": backend.database})

    def forget(self, uuid: str) -> None:
        self.relayed.pop(uuid, None)
        self.spares.forget(uuid)
