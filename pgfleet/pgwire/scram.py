"""SCRAM-SHA-256 verifiers in PostgreSQL's own storage format (pg_authid.rolpassword):

    SCRAM-SHA-256$<iterations>:<salt base64>$<StoredKey base64>:<ServerKey base64>

Only the verifier is ever stored; the password is shown to the user once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from scramp.core import saslprep

MECHANISM = "SCRAM-SHA-256"
ITERATIONS = 4096  # PostgreSQL's default scram_iterations

_VERIFIER = re.compile(
    r"^SCRAM-SHA-256\$(?P<i>\d+):(?P<salt>[A-Za-z0-9+/=]+)\$(?P<stored>[A-Za-z0-9+/=]+):(?P<server>[A-Za-z0-9+/=]+)$"
)


@dataclass(frozen=True)
class Verifier:
    salt: bytes
    stored_key: bytes
    server_key: bytes
    iterations: int

    def encode(self) -> str:
        b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
        return f"{MECHANISM}${self.iterations}:{b64(self.salt)}${b64(self.stored_key)}:{b64(self.server_key)}"

    @classmethod
    def decode(cls, text: str) -> "Verifier":
        m = _VERIFIER.match(text)
        if m is None:
            raise ValueError("not a SCRAM-SHA-256 verifier")
        return cls(
            salt=base64.b64decode(m["salt"]),
            stored_key=base64.b64decode(m["stored"]),
            server_key=base64.b64decode(m["server"]),
            iterations=int(m["i"]),
        )

    @classmethod
    def from_password(cls, password: str, iterations: int = ITERATIONS, salt: bytes | None = None) -> "Verifier":
        # SCRAM's Hi() is PBKDF2-HMAC-SHA-256: hashlib's C loop takes ~2 ms where a
        # Python loop (scramp's) takes ~30 ms of CPU, which bounded the create rate
        salt = secrets.token_bytes(16) if salt is None else salt
        # SASLprep leaves printable ASCII (every generated password) as it is, and is slow
        prepared = password if password.isascii() and password.isprintable() else saslprep(password)
        salted = hashlib.pbkdf2_hmac("sha256", prepared.encode("utf-8"), salt, iterations)
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        return cls(salt, hashlib.sha256(client_key).digest(), server_key, iterations)


def generate_password() -> str:
    """A URL-safe password with ~190 bits of entropy (needs no quoting in a URI)."""
    return secrets.token_urlsafe(24)
