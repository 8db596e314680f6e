"""Issue 10 item 3: the home's state, logs and keys are unreadable by instance uids."""

from __future__ import annotations

import stat

import pytest

from ..conftest import SANDBOX_SKIP

pytestmark = pytest.mark.skipif(SANDBOX_SKIP is not None, reason=f"SKIPPED LOUDLY: {SANDBOX_SKIP}")


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_home_secrets_and_logs_are_root_only(daemon):
    daemon.cli("db", "create", "shop")
    home = daemon.home
    for name in ("state.db", "token", "daemon.log"):
        assert _mode(home / name) & 0o077 == 0, f"{name} is {oct(_mode(home / name))}"
    for wal in home.glob("state.db-*"):
        assert _mode(wal) & 0o077 == 0, f"{wal.name} is {oct(_mode(wal))}"
    assert _mode(home / "tls") & 0o077 == 0
    (instance,) = (home / "instances").iterdir()
    assert _mode(instance / "postgres.log") & 0o077 == 0
    for f in (instance / "auth").iterdir():  # hba/ident: readable, never writable, by the tenant
        assert _mode(f) & 0o022 == 0 and f.stat().st_uid == 0
