"""node-postgres (`pg` from npm, pinned in tests/compat/node/package-lock.json) through both
listeners: tests/compat/node/run.js runs the queries and prints JSON that is checked here."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parent / "node"

pytestmark = [pytest.mark.timeout(120), pytest.mark.skipif(
    shutil.which("node") is None or not (NODE_DIR / "node_modules" / "pg").is_dir(),
    reason="SKIPPED LOUDLY: node or tests/compat/node/node_modules missing: run scripts/install-deps.sh")]


def test_node_postgres(target, table):
    env = target.libpq_env() | {"COMPAT_TABLE": table}
    p = subprocess.run(["node", str(NODE_DIR / "run.js")], cwd=NODE_DIR, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["one"] == 1
    assert out["user"] == target.user
    assert out["encrypted"] == target.tls
    assert out["sum"] == 42
    assert out["echo"] == {"t": "héllo", "j": {"a": [1, 2]}}
    assert out["prepared"] == [3 * i for i in range(10)]
    assert out["count"] == 20
    assert out["error"] == "22012"  # division_by_zero
    assert out["after_error"] == 2
    assert out["multi"] == [{"a": 1}, {"b": 2}]
    assert out["pool"] == [i * i for i in range(50)]
