"""Cleartext passwords (SQL over HTTP, WebSocket pipelineConnect) against stored SCRAM verifiers."""

from __future__ import annotations

import pytest
from scramp import ScramMechanism

from pgfleet.edge.passwords import PasswordChecker
from pgfleet.pgwire.scram import Verifier
from pgfleet.proxy.auth import password_matches


@pytest.mark.parametrize("password", ["secret", "héllo wörld", "I\u00adX\u00a0y", "ß" * 40])
def test_matches_verifiers_made_by_scramp(password):
    salt, stored, server, iterations = ScramMechanism("SCRAM-SHA-256").make_auth_info(password, 4096)
    verifier = Verifier(salt, stored, server, iterations)
    assert password_matches(password, verifier)
    assert not password_matches(password + "x", verifier)
    assert not password_matches("\u0007" + password, verifier)  # SASLprep refuses it: no match, no error


async def test_checker_caches_successes_per_verifier_only():
    checker = PasswordChecker(cache_size=2)
    old, new = Verifier.from_password("one").encode(), Verifier.from_password("two").encode()
    assert await checker.check(old, "one") and await checker.check(old, "one")
    assert checker.checks == 1
    assert not await checker.check(old, "two") and not await checker.check(old, "two")
    assert checker.checks == 3  # failures are never cached
    assert not await checker.check(new, "one")  # a rotated password: the old one is checked again, and fails
    assert not await checker.check(old, "\ud800")  # not encodable: refused without a check
