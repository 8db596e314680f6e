"""psql (libpq, the simple query protocol) through both listeners, as a subprocess."""

from __future__ import annotations

import shutil
import subprocess

import pytest

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("psql") is None, reason="SKIPPED LOUDLY: psql is not installed")]


def psql(target, *args: str, stdin: str | None = None, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = target.libpq_env() | (env_extra or {})
    return subprocess.run(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", *args], input=stdin, env=env,
                          capture_output=True, text=True, timeout=60)


def test_command(target):
    p = psql(target, "-c", "SELECT current_user, 6 * 7")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"{target.user}|42"


def test_uri_without_environment(target):
    p = subprocess.run(["psql", "-X", "-At", target.url(), "-c", "SELECT 'via uri'"], capture_output=True, text=True,
                       timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "via uri"


def test_script(target, table):
    script = f"""
\\set n 250
DROP TABLE IF EXISTS {table};
CREATE TABLE {table} (id int PRIMARY KEY, v text);
BEGIN;
INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, :n) g;
COMMIT;
COPY {table} (id, v) FROM STDIN;
1001\tcopied one
1002\tcopied two
\\.
SELECT count(*) AS c FROM {table} \\gset
\\echo count=:c
SELECT v FROM {table} WHERE id = 1002;
BEGIN;
DELETE FROM {table};
ROLLBACK;
SELECT count(*) FROM {table};
\\copy (SELECT id FROM {table} WHERE id < 4 ORDER BY id) TO STDOUT
DROP TABLE {table};
"""
    p = psql(target, "-q", "-f", "-", stdin=script)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["count=252", "copied", "two", "252", "1", "2", "3"]


def test_error_stops_script(target):
    p = psql(target, "-f", "-", stdin="SELECT 1;\nSELECT 1/0;\nSELECT 'not reached';\n")
    assert p.returncode == 3
    assert "division by zero" in p.stderr
    assert "not reached" not in p.stdout


def test_wrong_password(target):
    p = psql(target, "-c", "SELECT 1", env_extra={"PGPASSWORD": "wrong"})
    assert p.returncode == 2
    assert "password authentication failed" in p.stderr


def test_large_output(target):
    p = psql(target, "-c", "SELECT g, md5(g::text) FROM generate_series(1, 100000) g")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 100000 and lines[-1].startswith("100000|")
