"""PostgreSQL v3 frontend/backend protocol: parsing and building of the messages pgfleet
itself has to understand (framing.py frames them, protocol.py names them). Everything else
is relayed as opaque bytes.

Reference: https://www.postgresql.org/docs/15/protocol-message-formats.html
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

# framing.py's, used through this module too (m.message, m.read_message, m.ProtocolError)
from .framing import MAX_MESSAGE_LENGTH, MAX_READ_WHOLE, ProtocolError, message, read_message  # noqa: F401
from .protocol import BackendMsg, ErrorField, TransactionStatus, byte

PROTOCOL_3_0 = 196608
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

#: startup packets are small; anything larger is hostile or broken (libpq caps at 10000)
MAX_STARTUP_LENGTH = 10_000

_I32 = struct.Struct("!i")


@dataclass
class SSLRequest:
    pass


@dataclass
class GSSENCRequest:
    pass


@dataclass
class CancelRequest:
    process_id: int
    secret_key: int


@dataclass
class StartupMessage:
    protocol: int
    params: dict[str, str] = field(default_factory=dict)

    @property
    def user(self) -> str:
        return self.params.get("user", "")

    @property
    def database(self) -> str:
        return self.params.get("database", "") or self.user


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def parse_startup(body: bytes) -> StartupPacket:
    """Parse a startup-phase packet body (the bytes after its length word)."""
    if len(body) < 4:
        raise ProtocolError("startup packet too short")
    (code,) = _I32.unpack_from(body, 0)
    if code == SSL_REQUEST_CODE and len(body) == 4:
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE and len(body) == 4:
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if len(body) != 12:
            raise ProtocolError("malformed cancel request")
        pid, key = struct.unpack_from("!ii", body, 4)
        return CancelRequest(pid, key)
    if code >> 16 != 3:
        raise ProtocolError(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}")
    return StartupMessage(code, _parse_params(body[4:]))


def _parse_params(data: bytes) -> dict[str, str]:
    if not data.endswith(b"\0"):
        raise ProtocolError("startup parameters are not terminated")
    parts = data[:-1].split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) % 2:
        raise ProtocolError("startup parameter without a value")
    try:
        decoded = [p.decode("utf-8") for p in parts]
    except UnicodeDecodeError as exc:
        raise ProtocolError("startup parameters are not valid UTF-8") from exc
    params = dict(zip(decoded[::2], decoded[1::2]))
    if "" in params:
        raise ProtocolError("empty startup parameter name")
    return params


async def read_startup(reader: asyncio.StreamReader) -> StartupPacket:
    header = await reader.readexactly(4)
    (length,) = _I32.unpack(header)
    if length < 8 or length > MAX_STARTUP_LENGTH:
        raise ProtocolError(f"invalid startup packet length {length}")
    return parse_startup(await reader.readexactly(length - 4))


def cstr(value: str) -> bytes:
    return value.encode("utf-8") + b"\0"


def startup_message(params: dict[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_3_0) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    return _I32.pack(len(body) + 4) + body


def cancel_request(process_id: int, secret_key: int) -> bytes:
    return struct.pack("!iiii", 16, CANCEL_REQUEST_CODE, process_id, secret_key)


def ssl_request() -> bytes:
    return struct.pack("!ii", 8, SSL_REQUEST_CODE)


# --- backend messages -------------------------------------------------------------

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


def authentication(code: int, payload: bytes = b"") -> bytes:
    return message(BackendMsg.AUTHENTICATION, _I32.pack(code) + payload)


def auth_sasl(mechanisms: list[str]) -> bytes:
    return authentication(AUTH_SASL, b"".join(cstr(m) for m in mechanisms) + b"\0")


def parameter_status(name: str, value: str) -> bytes:
    return message(BackendMsg.PARAMETER_STATUS, cstr(name) + cstr(value))


def backend_key_data(process_id: int, secret_key: int) -> bytes:
    return message(BackendMsg.BACKEND_KEY_DATA, struct.pack("!ii", process_id, secret_key))


def ready_for_query(status: int = TransactionStatus.IDLE) -> bytes:
    return message(BackendMsg.READY_FOR_QUERY, byte(status))


def error_response(
    sqlstate: str, text: str, severity: str = "FATAL", detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    fields = [(ErrorField.SEVERITY, severity), (ErrorField.SEVERITY_NONLOCALIZED, severity),
              (ErrorField.SQLSTATE, sqlstate), (ErrorField.MESSAGE, text)]
    fields += [(code, value) for code, value in ((ErrorField.DETAIL, detail), (ErrorField.HINT, hint)) if value]
    return message(BackendMsg.ERROR_RESPONSE, b"".join(byte(code) + cstr(value) for code, value in fields) + b"\0")


def parse_error_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse body -> {field code: value}."""
    out: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            out[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return out


def parse_data_row(body: bytes) -> list[bytes | None]:
    """The column values of a DataRow body (None for SQL NULL)."""
    values: list[bytes | None] = []
    pos = 2
    for _ in range(int.from_bytes(body[:2], "big")):
        length = int.from_bytes(body[pos : pos + 4], "big", signed=True)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[pos : pos + length])
            pos += length
    return values


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    """SASLInitialResponse ('p') body -> (mechanism, client-first-message)."""
    end = body.find(b"\0")
    if end < 0 or len(body) < end + 5:
        raise ProtocolError("malformed SASLInitialResponse")
    mechanism = body[:end].decode("ascii", "replace")
    (length,) = _I32.unpack_from(body, end + 1)
    data = body[end + 5 :]
    if length == -1:
        data = b""
    elif length != len(data):
        raise ProtocolError("SASLInitialResponse length mismatch")
    return mechanism, data
