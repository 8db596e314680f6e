"""What the direct and pooled listeners' sessions share: waking their database, counting
a session being set up as busy, and taking over a stream's read-ahead."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Iterator

from pgfleet.drivers.base import Backend
from pgfleet.fleet.errors import FleetError, NotFound, QuotaExceeded
from pgfleet.fleet.manager import Fleet
from pgfleet.store import InstanceRow

from .errors import ClientError

#: how long a session's setup waits for its database (after the wake that admitted it)
WAKE_TIMEOUT_S = 60.0


async def wake(fleet: Fleet, uuid: str) -> Backend:
    """The database running (woken if need be), or the client's error."""
    try:
        return await fleet.ensure_running(uuid)
    except NotFound:
        raise ClientError("3D000", "database does not exist")
    except QuotaExceeded as exc:  # configuration_limit_exceeded: the host's quota, not this client
        raise ClientError("53400", str(exc))
    except FleetError as exc:
        raise ClientError("57P03", str(exc))


def tracks_transactions(fleet: Fleet, row: InstanceRow) -> bool:
    """Follow each transaction only where an idle session may outlive a suspend (the
    `idle` policy, on a driver that keeps sessions); elsewhere an open session keeps its
    database up anyway and counts as busy for its whole life, at no cost per message."""
    return fleet.keeps_sessions_across_suspend and row.stz_policy == "idle"


@contextlib.contextmanager
def starting(fleet: Fleet, uuid: str) -> Iterator[None]:
    """A session being set up counts as busy: its database is never frozen under its
    startup exchange, which no relay watches yet (`idle` policy)."""
    fleet.session_busy(uuid, True)
    try:
        yield
    finally:
        fleet.session_busy(uuid, False)


def take_buffer(reader: asyncio.StreamReader) -> bytes:
    """Bytes the stream had already read past the handshake (pipelining clients)."""
    buf = reader._buffer  # type: ignore[attr-defined]
    data = bytes(buf)
    buf.clear()
    return data
