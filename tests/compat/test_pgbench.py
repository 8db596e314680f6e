"""pgbench through both listeners: the built-in scripts in every query mode, and a
connection per transaction (-C)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("pgbench") is None, reason="SKIPPED LOUDLY: pgbench is not installed")]

CLIENTS, TXS = 4, 50


@pytest.fixture(scope="module")
def pgbench_tables(compat_daemon):
    """pgbench's tables, made once through the direct listener as the database's role."""
    init = compat_daemon.target("direct", "disable")
    p = subprocess.run(["pgbench", "-i", "-s", "1", "-q"], env=init.libpq_env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr


def pgbench(target, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["pgbench", "-n", "-c", str(CLIENTS), "-j", "2", "-t", str(TXS), *args],
                          env=target.libpq_env(), capture_output=True, text=True, timeout=120)


def assert_clean_run(p: subprocess.CompletedProcess) -> None:
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert f"number of transactions actually processed: {CLIENTS * TXS}/{CLIENTS * TXS}" in out, out
    failed = re.search(r"number of failed transactions: (\d+)", out)
    assert failed is None or failed.group(1) == "0", out
    assert "aborted" not in out.lower(), out


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
@pytest.mark.parametrize("script", ["select-only", "tpcb-like"])
def test_builtin(target, pgbench_tables, script, mode):
    assert_clean_run(pgbench(target, "-b", script, "-M", mode))


@pytest.mark.parametrize("mode", ["simple", "prepared"])
def test_connection_per_transaction(target, pgbench_tables, mode):
    assert_clean_run(pgbench(target, "-C", "-S", "-M", mode))
