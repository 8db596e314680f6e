"""Spare server sessions: a new client of a warm database gets a backend that already exists.

A new session on a warm database otherwise costs a Postgres fork from a postmaster whose
memory is in swap (measured: 8 ms, against 3.5 ms on a running one). So as a database is
frozen, the direct listener opens one session on it first, with the startup parameters
of its last client, and that session is frozen with the rest. The first new client after
the thaw whose parameters match takes it: no fork, no catalog loading.

A spare is exactly a session opened at the freeze. It is taken only by a client whose
startup packet arrived while the database was still frozen by that very freeze (the
database's start count has not moved since): whatever that client finds (role settings
changed by `ALTER ROLE ... SET` in a held session after the thaw, say) happened at the same
time as its connection, so a session from before the change is as right as one from after.
A spare that has missed its moment is closed, never handed out later. It is a backend of
the tenant's own role, opened by the proxy from a running database: nothing a client
does before authentication opens, wakes or holds one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from pgfleet.drivers.base import Backend

from .connect import open_session
from .errors import ClientError

log = logging.getLogger(__name__)

#: opening a spare happens under the freeze; a database too slow to give one goes without
OPEN_TIMEOUT_S = 2.0


@dataclass
class Spare:
    params: dict[str, str]
    #: the database's start count while it was frozen with this session in it
    epoch: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    replies: list[tuple[int, bytes]]
    watcher: asyncio.Task | None = field(default=None, repr=False)

    def usable(self) -> bool:
        """Still connected, with nothing unread (a backend that was terminated, or one that
        reported a changed setting, is not taken)."""
        return not (self.writer.is_closing() or self.reader.at_eof()
                    or self.reader._buffer)  # type: ignore[attr-defined]

    def close(self) -> None:
        if self.watcher is not None and self.watcher is not asyncio.current_task():
            self.watcher.cancel()
        self.writer.close()


class Spares:
    """At most one spare per database, and the startup parameters of its last client."""

    def __init__(self) -> None:
        self._spares: dict[str, Spare] = {}
        self._last_params: dict[str, dict[str, str]] = {}
        #: since the daemon started (metrics): spares opened, handed to a client, closed unused
        self.counts = {"opened": 0, "taken": 0, "discarded": 0}

    def __len__(self) -> int:
        return len(self._spares)

    def note_client(self, uuid: str, params: dict[str, str]) -> None:
        """The parameters (as forwarded) of a new client: the next spare is opened with them."""
        self._last_params[uuid] = params

    async def open(self, uuid: str, backend: Backend, epoch: int, params: dict[str, str]) -> None:
        """Open the spare of a database about to be frozen (replacing any it had)."""
        self.drop(uuid)
        last = self._last_params.get(uuid, {})
        try:
            reader, writer, replies = await open_session(backend, {**last, **params}, OPEN_TIMEOUT_S)
        except (ClientError, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
            log.debug("no spare session for %s: %s", uuid, exc)
            return
        except Exception as exc:  # BackendRefused and the like: the database's own answer
            log.info("no spare session for %s: %s", uuid, exc)
            return
        spare = Spare(last, epoch, reader, writer, replies)
        self.counts["opened"] += 1
        spare.watcher = asyncio.ensure_future(self._forget_when_closed(uuid, spare))
        self._spares[uuid] = spare

    def take(self, uuid: str, params: dict[str, str], epoch: int) -> Spare | None:
        """The database's spare for a client whose startup arrived at `epoch` with these
        forwarded parameters, or None. A spare that cannot serve this client is closed: it
        would be stale for any later one too."""
        spare = self._spares.pop(uuid, None)
        if spare is None:
            return None
        if spare.epoch != epoch or not spare.usable():
            self._discard(spare)
            return None
        if spare.params != params:  # a client of another kind: the spare waits for its own
            self._spares[uuid] = spare
            return None
        if spare.watcher is not None:
            spare.watcher.cancel()
        self.counts["taken"] += 1
        return spare

    def drop(self, uuid: str) -> None:
        spare = self._spares.pop(uuid, None)
        if spare is not None:
            self._discard(spare)

    def _discard(self, spare: Spare) -> None:
        self.counts["discarded"] += 1
        spare.close()

    def forget(self, uuid: str) -> None:
        self.drop(uuid)
        self._last_params.pop(uuid, None)

    def close_all(self) -> None:
        for uuid in list(self._spares):
            self.drop(uuid)

    async def _forget_when_closed(self, uuid: str, spare: Spare) -> None:
        """A spare whose backend went away (cold standby, a stop), or said anything at all
        (an idle backend speaks only to say it is being terminated or that a setting
        changed), lets go of its socket. (`wait_closed` would not do: a stream stays
        half open after the peer's EOF.)"""
        try:
            await spare.reader.read(1)
        except (ConnectionError, OSError):
            pass
        if self._spares.get(uuid) is spare:
            del self._spares[uuid]
            self._discard(spare)  # (close() leaves this watcher, the current task, alone)
