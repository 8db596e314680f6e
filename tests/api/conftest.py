"""Fixtures for the API tests: one real `pgfleet up --detach` daemon (sandbox driver) per
module, reached over real HTTP with its real token; small quotas so that generated
requests cannot fill the host."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import SANDBOX_SKIP, start_daemon, stop_daemon

#: quotas the test daemons run with (pgfleet.fleet.quotas reads them from the environment)
QUOTA_INSTANCES = 3


@contextmanager
def daemon_with(**quota_env: str):
    """A real daemon in its own private directory (0711, as tests/conftest.py's tmp_path:
    per-database uids pass through it), stopped and removed afterwards."""
    if SANDBOX_SKIP:
        pytest.skip(f"SKIPPED LOUDLY: {SANDBOX_SKIP}")
    base = Path(tempfile.mkdtemp(prefix="pgfleet-api-test-", dir="/var/tmp"))
    os.chmod(base, 0o711)
    home = base / "pgfleet-home"
    env = dict(os.environ, PGFLEET_HOME=str(home), PGPASSFILE=str(base / "pgpass"), **quota_env)
    env.pop("PGPASSWORD", None)
    try:
        d = start_daemon(home, env)
        try:
            yield d
        finally:
            stop_daemon(d)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def api_daemon():
    with daemon_with(PGFLEET_QUOTA_INSTANCES=str(QUOTA_INSTANCES), PGFLEET_QUOTA_LIVE_MEMORY_MB="2048") as d:
        yield d


@pytest.fixture(scope="module")
def api_url(api_daemon) -> str:
    return api_daemon.info["api_url"]


@pytest.fixture(scope="module")
def api_token(api_daemon) -> str:
    return api_daemon.cli("token").stdout.strip()


@pytest.fixture
def http(api_url, api_token):
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {api_token}"}, timeout=120) as c:
        yield c
