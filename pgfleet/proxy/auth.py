"""Server side of SCRAM-SHA-256 (RFC 5802/7677) against a stored PostgreSQL-format verifier."""

from __future__ import annotations

import asyncio
import hmac

from scramp import ScramException, ScramMechanism

from pgfleet.pgwire import messages as m
from pgfleet.pgwire.protocol import FrontendMsg, byte
from pgfleet.pgwire.scram import MECHANISM, Verifier

# Used when the role is unknown, so that the exchange looks and costs the same either way.
_DUMMY = Verifier.from_password("pgfleet-no-such-role", 4096)
_MECHANISM = ScramMechanism(MECHANISM)


class AuthFailed(Exception):
    pass


async def scram_authenticate(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, verifier: Verifier | None
) -> None:
    """Run the exchange; raises AuthFailed (wrong password or unknown role) or ProtocolError.

    Leaves AuthenticationOk unsent: the caller sends it once it has decided to go on.
    """
    v = verifier or _DUMMY
    server = _MECHANISM.make_server(lambda _user: (v.salt, v.stored_key, v.server_key, v.iterations))
    writer.write(m.auth_sasl([MECHANISM]))
    kind, body = await m.read_message(reader, max_length=m.MAX_STARTUP_LENGTH)
    if kind != FrontendMsg.PASSWORD:
        raise m.ProtocolError(f"expected SASLInitialResponse, got {byte(kind)!r}")
    mechanism, client_first = m.parse_sasl_initial_response(body)
    if mechanism != MECHANISM:
        raise AuthFailed(f"unsupported SASL mechanism {mechanism!r}")
    try:
        server.set_client_first(client_first.decode("utf-8"))
        writer.write(m.authentication(m.AUTH_SASL_CONTINUE, server.get_server_first().encode()))
        kind, body = await m.read_message(reader, max_length=m.MAX_STARTUP_LENGTH)
        if kind != FrontendMsg.PASSWORD:
            raise m.ProtocolError(f"expected SASLResponse, got {byte(kind)!r}")
        server.set_client_final(body.decode("utf-8"))
        final = server.get_server_final()
    except (ScramException, UnicodeDecodeError) as exc:
        raise AuthFailed(str(exc)) from exc
    if verifier is None:
        raise AuthFailed("unknown role")
    writer.write(m.authentication(m.AUTH_SASL_FINAL, final.encode()))


def password_matches(password: str, verifier: Verifier) -> bool:
    """A cleartext password against a stored SCRAM verifier: the verifier it makes with the
    same salt and iterations (SASLprep included) has the same StoredKey, compared in constant
    time. Costs one PBKDF2 of the verifier's iterations."""
    try:
        candidate = Verifier.from_password(password, verifier.iterations, verifier.salt)
    except (ScramException, ValueError, UnicodeError):  # SASLprep refuses prohibited characters
        return False
    return hmac.compare_digest(candidate.stored_key, verifier.stored_key)


async def cleartext_authenticate(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, verifier: Verifier | None
) -> None:
    """AuthenticationCleartextPassword, for WebSocket clients (inside TLS, or on loopback) that
    send their password ahead (the Neon driver's pipelineConnect). Checked against the verifier;
    raises AuthFailed or ProtocolError. Leaves AuthenticationOk unsent, as scram_authenticate."""
    writer.write(m.authentication(m.AUTH_CLEARTEXT))
    kind, body = await m.read_message(reader, max_length=m.MAX_STARTUP_LENGTH)
    if kind != FrontendMsg.PASSWORD or not body.endswith(b"\0"):
        raise m.ProtocolError("expected a PasswordMessage")
    try:
        password = body[:-1].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AuthFailed("password is not UTF-8") from exc
    if not password_matches(password, verifier or _DUMMY) or verifier is None:
        raise AuthFailed("wrong password")
