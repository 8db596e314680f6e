"""The unauthenticated phase of a client connection: SSL negotiation up to the startup
packet, then the password (SCRAM-SHA-256, or cleartext sent ahead through a tunnel that
allows it) against the database's stored verifier, under the login backoff."""

from __future__ import annotations

import asyncio
import ssl

from pgfleet.fleet.events import EventLog
from pgfleet.pgwire import messages as m
from pgfleet.pgwire.protocol import SSL_ACCEPTED, SSL_REFUSED, FrontendMsg, byte
from pgfleet.pgwire.scram import Verifier
from pgfleet.store import InstanceRow

from .auth import AuthFailed, cleartext_authenticate, scram_authenticate
from .errors import ClientError
from .guards import LoginThrottle
from .stats import ProxyStats


async def handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    tls: ssl.SSLContext | None) -> tuple[m.StartupPacket, bool]:
    """The client's startup packet (or CancelRequest), after TLS if it asked and `tls` is
    set; and whether TLS was used."""
    tls_used = False
    while True:
        packet = await m.read_startup(reader)
        if isinstance(packet, m.SSLRequest):
            if tls is None or tls_used:
                writer.write(SSL_REFUSED)
                continue
            writer.write(SSL_ACCEPTED)
            await writer.drain()
            if reader._buffer:  # type: ignore[attr-defined]
                raise m.ProtocolError("data after SSLRequest before the TLS handshake")
            await writer.start_tls(tls)
            tls_used = True
            continue
        if isinstance(packet, m.GSSENCRequest):
            writer.write(SSL_REFUSED)
            continue
        return packet, tls_used


class Login:
    """Password checks of one listener, counted in its stats and reported as events."""

    def __init__(self, events: EventLog, logins: LoginThrottle, stats: ProxyStats, listener: str) -> None:
        self.events = events
        self.logins = logins
        self.stats = stats
        self.listener = listener

    async def authenticate(self, startup: m.StartupMessage, row: InstanceRow, source: str,
                           reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           cleartext: bool = False) -> None:
        """SCRAM-SHA-256 (or a cleartext password sent ahead, for tunnels that allow it) of a
        client against its database's stored verifier, under the login backoff; raises
        ClientError 28P01 or 28000 (backing off), each an event with its source. Leaves
        AuthenticationOk to the caller."""
        user = startup.user
        logins = self.logins
        try:
            logins.check(user, source)
        except ClientError:
            self.events.emit("connection_refused", row.name, reason="login backoff", user=user[:64],
                             listener=self.listener, peer=source)
            raise
        verifier = Verifier.decode(row.verifier) if user == row.role else None
        try:
            if cleartext and _pipelined_password(reader):
                await cleartext_authenticate(reader, writer, verifier)
            else:
                await scram_authenticate(reader, writer, verifier)
        except AuthFailed as exc:
            failures = logins.failed(user, source)
            self.note_failure(row, user, self.listener, source, reason=(str(exc) or "wrong password")[:200],
                              failures=failures)
            raise ClientError("28P01", f'password authentication failed for user "{user}"')
        logins.succeeded(user, source)

    def note_failure(self, row: InstanceRow, user: str, listener: str, peer, **fields) -> None:
        """Count and report a failed login (also SQL over HTTP's, on the pooled listener's stats)."""
        self.stats.auth_failures += 1
        failures = self.stats.auth_failures_by_db
        failures[row.uuid] = failures.get(row.uuid, 0) + 1
        self.events.emit("auth_failure", row.name, user=user[:64], listener=listener, peer=peer, **fields)


def _pipelined_password(reader: asyncio.StreamReader) -> bool:
    """The client sent a PasswordMessage with its startup packet, before being asked."""
    return reader._buffer[:1] == byte(FrontendMsg.PASSWORD)  # type: ignore[attr-defined]
