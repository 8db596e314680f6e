"""Password checks of SQL-over-HTTP requests against the stored SCRAM verifier.

Each check is a PBKDF2 of the verifier's iterations (milliseconds): it runs in a worker thread
(hashlib releases the GIL), at most a few at once, and successes are remembered (keyed by a
keyed hash of the password, never the password itself) so that a client sending the same
credentials with every request pays for it once. A new verifier (rotated password) is a new key.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections import OrderedDict
from dataclasses import dataclass

from pgfleet.proxy.auth import password_matches
from pgfleet.pgwire.scram import Verifier

#: PBKDF2 checks running at once: the rest wait (a flood of bad passwords costs a bounded CPU share)
CONCURRENT_CHECKS = 2


class PasswordChecker:
    def __init__(self, cache_size: int) -> None:
        self.cache_size = cache_size
        self._key = secrets.token_bytes(32)
        self._ok: OrderedDict[bytes, None] = OrderedDict()
        self._slots = asyncio.Semaphore(CONCURRENT_CHECKS)
        self.checks = 0  # PBKDF2 runs (stats, tests)

    async def check(self, verifier_text: str, password: str) -> bool:
        try:
            password.encode("utf-8")
        except UnicodeEncodeError:
            return False
        key = hashlib.blake2b(verifier_text.encode() + b"\0" + password.encode("utf-8"), key=self._key,
                              digest_size=32).digest()  # keyed: a one-shot MAC, cheaper than hmac.digest
        if key in self._ok:
            self._ok.move_to_end(key)
            return True
        verifier = Verifier.decode(verifier_text)
        async with self._slots:
            self.checks += 1
            ok = await asyncio.to_thread(password_matches, password, verifier)
        if ok:
            self._ok[key] = None
            if len(self._ok) > self.cache_size:
                self._ok.popitem(last=False)
        return ok


@dataclass(frozen=True, slots=True)
class Login:
    """What a verified Neon-Connection-String led to."""

    user: str
    database: str  # the database it routed to
    verifier: str  # the verifier its password matched (a rotated password no longer does)


class KnownLogins:
    """Connection strings (with the TLS server name that took part in routing) whose password
    was verified, so that a client repeating its header skips parsing, routing and the check.
    Looked up by a keyed MAC of the whole text: no comparison ever runs over the password (a
    client learns nothing from timing), a different password is a different key (checked in
    full), and the password itself is not kept."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._key = secrets.token_bytes(32)
        self._logins: OrderedDict[bytes, Login] = OrderedDict()

    def key(self, text: str, sni: str | None) -> bytes:
        data = (text if sni is None else f"{sni}\0{text}").encode("utf-8", "surrogatepass")
        return hashlib.blake2b(data, key=self._key, digest_size=32).digest()

    def get(self, key: bytes) -> Login | None:
        login = self._logins.get(key)
        if login is not None:
            self._logins.move_to_end(key)
        return login

    def add(self, key: bytes, login: Login) -> None:
        self._logins[key] = login
        if len(self._logins) > self.size:
            self._logins.popitem(last=False)
