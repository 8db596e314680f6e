"""API input bounds (issue 10, item 10): the body size limit holds while the body is read
(a chunked body has no Content-Length to check up front), and every string field has a
maximum length; both answered with a clear 4xx JSON. A real daemon over real HTTP."""

from __future__ import annotations

import httpx
import pytest

from pgfleet.api.common import MAX_BODY_BYTES, MAX_STRING
from tests.api.conftest import daemon_with


@pytest.fixture(scope="module")
def api():
    with daemon_with() as d:
        token = d.cli("token").stdout.strip()
        with httpx.Client(base_url=d.info["api_url"], headers={"Authorization": f"Bearer {token}"},
                          timeout=60) as client:
            yield client


def _chunks(total: int, size: int = 64 << 10):
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield b" " * n
        sent += n


def _error(resp: httpx.Response, status: int) -> str:
    assert resp.status_code == status, (resp.status_code, resp.text[:300])
    body = resp.json()
    assert body["status"] == "error"
    return body["message"]


def test_a_declared_body_over_the_limit_is_413(api):
    message = _error(api.post("/v1/databases", content=b"{" + b" " * MAX_BODY_BYTES + b"}",
                              headers={"content-type": "application/json"}), 413)
    assert str(MAX_BODY_BYTES) in message


def test_a_chunked_body_over_the_limit_is_413(api):
    resp = api.post("/v1/databases", content=_chunks(4 * MAX_BODY_BYTES),
                    headers={"content-type": "application/json"})
    assert "content-length" not in resp.request.headers  # really chunked
    assert resp.request.headers.get("transfer-encoding") == "chunked"
    _error(resp, 413)
    assert api.get("/healthz").status_code == 200


def test_a_chunked_body_under_the_limit_is_served(api):
    resp = api.post("/v1/databases", content=iter([b'{"name": ', b'"Bad_Name"}']),
                    headers={"content-type": "application/json"})
    assert resp.request.headers.get("transfer-encoding") == "chunked"
    assert "invalid database name" in _error(resp, 400)


@pytest.mark.parametrize("path,body", [
    ("/v1/databases", {"name": "shop", "image": "p" * (MAX_STRING + 1)}),
    ("/v1/instances", {"image": "postgres:15", "tags": ["t" * (MAX_STRING + 1)]}),
    ("/v1/instances", {"image": "postgres:15", "env": {"K": "v" * (MAX_STRING + 1)}}),
    ("/v1/instances", {"image": "postgres:15", "args": ["a" * (MAX_STRING + 1)]}),
    ("/v1/instances", {"image": {"url": "postgres:15", "headers": {"h": "x" * (MAX_STRING + 1)}}}),
    ("/v1/instances", {"image": "postgres:15", "volumes": [{"at": "/d", "x": {"y": "z" * (MAX_STRING + 1)}}]}),
])
def test_every_string_field_has_a_maximum_length(api, path, body):
    message = _error(api.post(path, json=body), 400)
    assert "invalid request" in message and ("at most" in message or "longer than" in message), message
