"""Bad input gets a clear 4xx and changes nothing; every endpoint but health needs the token."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def keep(api_daemon, api_url, api_token):
    """One real database that every bad request below must leave exactly as it was."""
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {api_token}"}, timeout=120) as c:
        r = c.post("/v1/instances", json={"name": "keep", "image": "postgres:15", "memory_mb": 128,
                                          "scale_to_zero": {"policy": "on", "cooldown_time_ms": 600_000}})
        assert r.status_code == 200, r.text
        return r.json()["data"]["instances"][0]


def snapshot(http: httpx.Client) -> list[dict]:
    items = http.get("/v1/instances").json()["data"]["instances"]
    return [{k: i[k] for k in ("uuid", "name", "state", "memory_mb", "scale_to_zero", "tags", "start_count")}
            for i in items]


def assert_envelope_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status"] == "error"
    assert body["message"]
    for w in words:
        assert w in body["message"], body["message"]
    return body


BAD_CREATES = [
    ({"name": "ok1", "image": "postgres:15", "bogus": 1}, "bogus"),
    ({"name": "ok1", "image": "postgres:15", "memory_mb": "256"}, "memory_mb"),
    ({"name": "ok1", "image": "postgres:15", "memory_mb": 1}, "memory_mb"),
    ({"name": "ok1", "image": "postgres:15", "memory_mb": 10**12}, "memory_mb"),
    ({"name": "ok1", "image": "postgres:15", "autostart": "yes"}, "autostart"),
    ({"name": "ok1", "image": "postgres:15", "env": {"POSTGRES_PASSWORD": 5}}, "env"),
    ({"name": "ok1", "image": "postgres:15", "env": {"POSTGRES_PASSWORD": "short"}}, "POSTGRES_PASSWORD"),
    ({"name": "ok1", "image": "postgres:15", "scale_to_zero": {"policy": "sometimes"}}, "policy"),
    ({"name": "ok1", "image": "postgres:15", "scale_to_zero": {"cooldown_time_ms": -5}}, "cooldown_time_ms"),
    ({"name": "ok1", "image": "postgres:15", "volumes": [{"name": "v", "at": "/data"}]}, "volume"),
    ({"name": "ok1", "image": "postgres:15", "replicas": 2}, "replicas"),
    ({"name": "ok1", "image": "postgres:15", "args": ["-c", "fsync=off"]}, "args"),
    ({"name": "ok1", "image": "postgres:15", "autostart": False, "timeout_s": 10}, "autostart"),
    ({"name": "ok1"}, "image"),
    ({"name": "ok1", "image": "nginx:latest"}, "image"),
    ({"name": "ok1", "image": {"url": "nginx:latest"}}, "postgres"),
    ({"name": "ok1", "image": {"url": "postgres:15", "bogus": True}}, "bogus"),
    ({"name": "Bad_Name", "image": "postgres:15"}, "name"),
    ({"name": "-lead", "image": "postgres:15"}, "name"),
    ({"name": "a" * 64, "image": "postgres:15"}, "name"),
    ({"name": "", "image": "postgres:15"}, "name"),
    ({"name": 7, "image": "postgres:15"}, "name"),
    ({"name": "postgres", "image": "postgres:15"}, "reserved"),
    ({"name": "ok1", "image": "postgres:15", "tags": ["x" * 200]}, "tag"),
    ([{"name": "ok1", "image": "postgres:15"}], ""),
]


@pytest.mark.parametrize("body,word", BAD_CREATES, ids=[str(i) for i in range(len(BAD_CREATES))])
def test_bad_create_is_400_and_changes_nothing(http, keep, body, word):
    before = snapshot(http)
    r = http.post("/v1/instances", json=body)
    assert_envelope_error(r, 400, word)
    assert snapshot(http) == before


def test_malformed_and_huge_bodies(http, keep):
    before = snapshot(http)
    r = http.post("/v1/instances", content=b"{not json", headers={"content-type": "application/json"})
    assert_envelope_error(r, 400)
    huge = json.dumps({"name": "ok1", "image": "postgres:15", "env": {"X": "y" * (2 << 20)}})
    r = http.post("/v1/instances", content=huge, headers={"content-type": "application/json"})
    assert_envelope_error(r, 413, "larger")
    r = http.put("/v1/instances/stop", content=b"[" + b'{"name":"keep"},' * 200_000 + b"{}]",
                 headers={"content-type": "application/json"})
    assert_envelope_error(r, 413)
    r = http.post("/v1/databases", json={"name": "x" * 5000})
    assert r.status_code == 400, r.text
    assert snapshot(http) == before


def test_bad_lifecycle_and_patch_items_change_nothing(http, keep):
    before = snapshot(http)
    uuid = keep["uuid"]
    cases = [
        ("put", "/v1/instances/stop", [{"uuid": uuid, "force": "yes"}], "force"),
        ("put", "/v1/instances/stop", [{"uuid": uuid, "bogus": 1}], "bogus"),
        ("put", f"/v1/instances/{uuid}/suspend", {"drain_timeout_ms": "soon"}, "drain_timeout_ms"),
        ("delete", "/v1/instances", [{"uuid": uuid, "extra": 1}], "extra"),
        ("delete", "/v1/instances", {"uuid": uuid, "timeout_s": "now"}, "timeout_s"),
        ("patch", f"/v1/instances/{uuid}", {"prop": "memory_mb", "op": "set", "value": "lots"}, "memory_mb"),
        ("patch", f"/v1/instances/{uuid}", {"prop": "memory_mb", "op": "set", "value": 99999999}, "memory_mb"),
        ("patch", f"/v1/instances/{uuid}", {"prop": "owner", "op": "set", "value": "me"}, "prop"),
        ("patch", f"/v1/instances/{uuid}", {"prop": "scale_to_zero", "op": "set",
                                             "value": {"policy": "maybe"}}, "policy"),
        ("patch", f"/v1/instances/{uuid}", {"prop": "image", "op": "set", "value": "postgres:16"}, "image"),
        ("get", f"/v1/instances/{uuid}/wait", {"state": "sleeping"}, "state"),
        ("get", "/v1/instances/log", [{"uuid": uuid, "limit": -1}], "limit"),
    ]
    for method, path, body, word in cases:
        r = http.request(method, path, json=body)
        assert_envelope_error(r, 400, word)
    r = http.patch(f"/v1/databases/{keep['name']}", json={"memory_mb": "big"})
    assert r.status_code == 400, r.text
    r = http.put(f"/v1/databases/{keep['name']}/suspend", json={"drain_timeout_ms": -3})
    assert r.status_code == 400, r.text
    assert snapshot(http) == before
    assert before[0]["state"] == "running"


def test_missing_and_conflicting(http, keep):
    before = snapshot(http)
    missing = "00000000-0000-4000-8000-000000000000"
    assert_envelope_error(http.get(f"/v1/instances/{missing}"), 404, missing)
    assert_envelope_error(http.put(f"/v1/instances/{missing}/stop"), 404)
    assert_envelope_error(http.delete(f"/v1/instances/{missing}"), 404)
    assert_envelope_error(http.get(f"/v1/volumes/{missing}"), 404)
    assert_envelope_error(http.get(f"/v1/services/{missing}"), 404)
    assert http.get(f"/v1/databases/{missing}").status_code == 404
    # bulk: one item fails, the other is reported; the envelope says so
    r = http.get("/v1/instances", params={"name": ["keep", "nope"]})
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "partial_success"
    ok, bad = body["data"]["instances"]
    assert ok["status"] == "success" and ok["name"] == "keep"
    assert bad == {"status": "error", "error": 8, "message": "no instance named 'nope'", "name": "nope"}
    # a wait that lapses says so, with the state it saw (what the SDK turns into WaitTimeoutError)
    r = http.request("GET", f"/v1/instances/{keep['uuid']}/wait", json={"state": "stopped", "timeout_ms": 100})
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "error" and body["message"] == "Operation timed out"
    assert body["data"]["instances"][0]["state"] == "running"
    # conflict
    r = http.post("/v1/instances", json={"name": "keep", "image": "postgres:15"})
    body = assert_envelope_error(r, 409, "already exists")
    assert body["data"]["instances"][0]["error"] == 23
    # a data volume cannot be deleted or detached on its own
    vol = http.get("/v1/volumes").json()["data"]["volumes"][0]
    assert_envelope_error(http.delete(f"/v1/volumes/{vol['uuid']}"), 409, "keep")
    assert_envelope_error(http.put(f"/v1/volumes/{vol['uuid']}/detach", json={}), 409)
    assert_envelope_error(http.post("/v1/volumes", json={"name": "v1", "size_mb": 10}), 400, "with the database")
    assert snapshot(http) == before


def test_every_endpoint_but_health_needs_the_token(api_url, keep):
    with httpx.Client(base_url=api_url, timeout=60) as anon:
        spec = anon.get("/openapi.json").json()
        assert anon.get("/healthz").status_code == 200
        checked = 0
        for path, ops in spec["paths"].items():
            if path == "/healthz":
                continue
            concrete = path.replace("{uuid}", keep["uuid"]).replace("{ref}", keep["name"])
            for method in ops:
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
                    r = anon.request(method, concrete, headers=headers)
                    assert r.status_code == 401, (method, path, r.status_code)
                    assert r.json()["status"] == "error"
                checked += 1
        assert checked > 40
