"""Property-based tests of the whole HTTP API from its own /openapi.json (schemathesis).

A real daemon serves the API; one database exists (so listings, metrics, volumes and
quotas have something real to report) and the quota allows no second one, so generated
creates answer 429 instead of filling the host. Checks: no 5xx, every status code
documented, every response body and content type matching the schema. The number of
examples is bounded so the run stays well under two minutes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import daemon_with

pytestmark = pytest.mark.timeout(300)

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.fixture(scope="module")
def fuzz_daemon():
    with daemon_with(PGFLEET_QUOTA_INSTANCES="1") as d:
        yield d


def test_schemathesis_against_openapi(fuzz_daemon, tmp_path):
    url = fuzz_daemon.info["api_url"]
    token = fuzz_daemon.cli("token").stdout.strip()
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=auth, timeout=120) as http:
        r = http.post("/v1/instances", json={"name": "fuzzdb", "image": "postgres:15",
                                              "scale_to_zero": {"policy": "on", "cooldown_time_ms": 600_000}})
        assert r.status_code == 200, r.text
        uuid = r.json()["data"]["instances"][0]["uuid"]
        assert http.get("/openapi.json", headers={"Authorization": ""}).status_code == 200
        docs = http.get("/docs", headers={"Authorization": ""})
        assert docs.status_code == 200 and "/openapi.json" in docs.text and "cdn" not in docs.text.lower()

    proc = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", f"{url}/openapi.json",
         "-H", f"Authorization: Bearer {token}", "--checks", CHECKS, "--max-examples", "15", "--seed", "20261127",
         "--workers", "1", "--no-color", "--phases", "examples,coverage,fuzzing", "--request-timeout", "60",
         "--report-dir", str(tmp_path),
         # follow=true is an endless event stream: tests/ops/test_events.py covers /v1/events
         "--exclude-path", "/v1/events"],
        capture_output=True, text=True, timeout=240,
    )
    summary = proc.stdout[-6000:]
    assert proc.returncode == 0, f"schemathesis found problems:\n{proc.stdout[-20000:]}\n{proc.stderr[-4000:]}"
    assert " passed" in summary

    # the seeded database came through the fuzzing untouched and still works
    with httpx.Client(base_url=url, headers=auth, timeout=120) as http:
        body = http.get(f"/v1/instances/{uuid}").json()
        assert body["data"]["instances"][0]["name"] == "fuzzdb"
        assert http.get("/v1/users/quotas").json()["data"]["quotas"][0]["used"]["instances"] == 1
