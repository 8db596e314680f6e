"""Protocol codec: valid messages round-trip; hostile bytes only ever raise ProtocolError."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgfleet.pgwire import messages as m
from pgfleet.pgwire.scram import Verifier, generate_password


def test_startup_round_trip():
    raw = m.startup_message({"user": "shop", "database": "shop", "application_name": "x"})
    packet = m.parse_startup(raw[4:])
    assert isinstance(packet, m.StartupMessage)
    assert packet.user == "shop" and packet.database == "shop"
    assert packet.params["application_name"] == "x"


def test_database_defaults_to_user():
    packet = m.parse_startup(m.startup_message({"user": "alice"})[4:])
    assert packet.database == "alice"


def test_ssl_and_cancel_requests():
    assert isinstance(m.parse_startup(m.ssl_request()[4:]), m.SSLRequest)
    cancel = m.parse_startup(m.cancel_request(1234, -99)[4:])
    assert cancel == m.CancelRequest(1234, -99)


@pytest.mark.parametrize("body", [
    b"", b"\x00\x03\x00\x00user\x00", b"\x00\x02\x00\x00user\x00x\x00\x00",
    b"\x00\x03\x00\x00user\x00\x00", b"\x00\x03\x00\x00\xff\xfe\x00x\x00\x00",
    struct.pack("!i", m.CANCEL_REQUEST_CODE) + b"\x00",
])
def test_malformed_startup_is_a_protocol_error(body):
    with pytest.raises(m.ProtocolError):
        m.parse_startup(body)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_parse_startup_never_crashes(body):
    try:
        m.parse_startup(body)
    except m.ProtocolError:
        pass


async def _read_all(data: bytes, startup: bool) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    while True:
        try:
            if startup:
                await m.read_startup(reader)
            else:
                await m.read_message(reader)
        except (m.ProtocolError, asyncio.IncompleteReadError):
            return


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_stream_reading_never_crashes_or_hangs(data, startup):
    asyncio.run(asyncio.wait_for(_read_all(data, startup), 5))


def test_oversized_lengths_are_refused_before_reading():
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(struct.pack("!i", 1 << 30) + b"x" * 10)
        with pytest.raises(m.ProtocolError):
            await m.read_startup(reader)

    asyncio.run(go())


def test_error_response_fields():
    body = m.error_response("3D000", 'database "x" does not exist')[5:]
    fields = m.parse_error_fields(body)
    assert fields["C"] == "3D000" and fields["S"] == "FATAL" and "does not exist" in fields["M"]


def test_scram_verifier_round_trip_and_format():
    v = Verifier.from_password("secret")
    text = v.encode()
    assert text.startswith("SCRAM-SHA-256$4096:")
    assert Verifier.decode(text) == v
    with pytest.raises(ValueError):
        Verifier.decode("md5abc")


@pytest.mark.parametrize("password", ["secret", "p\u00e4ssw\u00f6rd with spaces", "x" * 200, "nbsp\u00a0inside"])
def test_scram_verifier_matches_scramp_reference(password):
    """The fast (hashlib) verifier is bit for bit what the scramp reference makes."""
    from scramp import ScramMechanism

    salt = bytes(range(16))
    ref = ScramMechanism("SCRAM-SHA-256").make_auth_info(password, 4096, salt=salt)
    v = Verifier.from_password(password, salt=salt)
    assert (v.salt, v.stored_key, v.server_key, v.iterations) == ref


def test_generated_passwords_are_distinct_and_uri_safe():
    pw = {generate_password() for _ in range(100)}
    assert len(pw) == 100
    assert all(p.replace("-", "").replace("_", "").isalnum() for p in pw)
