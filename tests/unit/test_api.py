"""The REST API in process (ASGI) over a fake-driver fleet: routes, status codes, envelopes,
validation against pgfleet.settings, and the quota checks of the start path."""

from __future__ import annotations

import httpx
import pytest

from pgfleet import settings as S
from pgfleet.api.app import create_app
from pgfleet.api.common import ApiContext
from pgfleet.fleet.quotas import Quotas

TOKEN = "unit-token"


@pytest.fixture
async def api(fleet, tmp_path):
    ctx = ApiContext(fleet=fleet, token=TOKEN, public_host="127.0.0.1", port=6432, pooled_port=6433,
                     driver="fake", home=str(tmp_path))
    transport = httpx.ASGITransport(app=create_app(ctx))
    async with httpx.AsyncClient(transport=transport, base_url="http://api",
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


async def test_needs_the_token_except_health(api):
    assert (await api.get("/healthz")).status_code == 200
    resp = await api.get("/v1/databases", headers={"Authorization": "Bearer wrong"})
    assert resp.status_code == 401 and resp.json()["code"] == "unauthorized"


async def test_create_shows_defaults_uris_and_the_password_once(api):
    resp = await api.post("/v1/databases", json={"name": "shop"})
    assert resp.status_code == 201, resp.text
    d = resp.json()["data"]
    assert d["memory_mb"] == S.MEMORY_MB.default
    assert d["pooling"] == {"pool_size": S.POOL_SIZE.default, "max_pooled_clients": S.MAX_POOLED_CLIENTS.default,
                            "max_direct_clients": S.MAX_DIRECT_CLIENTS.default}
    assert d["uri"] == f"postgresql://shop:{d['password']}@127.0.0.1:6432/shop"
    shown = (await api.get("/v1/databases/shop")).json()["data"]
    assert "password" not in shown and shown["uri"] == "postgresql://shop@127.0.0.1:6432/shop"


@pytest.mark.parametrize("body, field", [
    ({"name": "shop", "memory_mb": S.MEMORY_MB.min - 1}, "memory_mb"),
    ({"name": "shop", "memory_mb": S.MEMORY_MB.max + 1}, "memory_mb"),
    ({"name": "shop", "pooling": {"pool_size": S.POOL_SIZE.max + 1}}, "pool_size"),
    ({"name": "shop", "scale_to_zero": {"cooldown_ms": -1}}, "cooldown_ms"),
    ({"name": "shop", "scale_to_zero": {"policy": "sometimes"}}, "policy"),
    ({"name": "Shop!"}, "invalid database name"),
    ({"name": "shop", "surprise": 1}, "surprise"),
])
async def test_bad_create_is_400_naming_the_field(api, body, field):
    resp = await api.post("/v1/databases", json=body)
    assert resp.status_code == 400, resp.text
    assert field in resp.json()["message"]


async def test_lifecycle_routes_and_404(api):
    await api.post("/v1/databases", json={"name": "shop"})
    assert (await api.put("/v1/databases/shop/suspend")).json()["data"]["state"] == "standby"
    assert (await api.put("/v1/databases/shop/resume")).json()["data"]["state"] == "running"
    assert (await api.put("/v1/databases/shop/stop", json={"drain_timeout_ms": 0})).json()["data"]["state"] == "stopped"
    events = (await api.get("/v1/databases/shop/history")).json()["data"]["events"]
    assert events[0]["to"] == "stopped"
    assert (await api.delete("/v1/databases/shop")).status_code == 200
    resp = await api.get("/v1/databases/shop")
    assert resp.status_code == 404 and resp.json()["code"] == "not_found"


async def test_quotas_report_and_refuse_a_resume_past_them(api, fleet):
    fleet.quotas = Quotas(instances=5, live_instances=1, live_memory_mb=4096)
    await api.post("/v1/databases", json={"name": "one", "autostart": False})
    await api.post("/v1/databases", json={"name": "two"})
    resp = await api.put("/v1/databases/one/resume")
    assert resp.status_code == 429 and resp.json()["code"] == "quota"
    q = (await api.get("/v1/users/quotas")).json()["data"]["quotas"][0]
    assert q["hard"]["live_instances"] == 1 and q["used"]["live_instances"] == 1
    assert q["limits"]["min_memory_mb"] == S.MEMORY_MB.min


async def test_status_reports_states_and_what_standby_does_here(api):
    await api.post("/v1/databases", json={"name": "shop"})
    data = (await api.get("/v1/status")).json()["data"]
    assert data["states"] == {"running": 1} and data["databases"] == 1
    assert data["standby"]["warm_mode"] is None and "cold only" in data["standby"]["explain"]
