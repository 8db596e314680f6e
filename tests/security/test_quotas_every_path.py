"""Issue 10 item 6: the live-instances quota holds on every path that starts a database.

The fleet checks it in its one start path, so a wake by a proxy connection (direct and
pooled listeners), a resume through the native API and a start through the UKC routes are
all refused once the host runs as many databases as its quota allows."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from pgfleet.api.app import create_app
from pgfleet.api.common import ApiContext
from pgfleet.fleet.errors import QuotaExceeded
from pgfleet.fleet.quotas import Quotas

TOKEN = "test-token"


async def _one_live_one_standby(env):
    """`sleeper` in standby and `awake` running, under a quota of one live database."""
    env.fleet.quotas = Quotas(live_instances=1)
    sleeper = await env.fleet.create("sleeper", autostart=False)
    awake = await env.fleet.create("awake")
    assert env.fleet.get("sleeper").state == "standby" and env.fleet.get("awake").state == "running"
    return sleeper, awake


def _api(env) -> httpx.AsyncClient:
    ctx = ApiContext(fleet=env.fleet, token=TOKEN, public_host="127.0.0.1", port=env.proxy.port,
                     pooled_port=0, driver="sandbox", home=str(env.home))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ctx)), base_url="http://api",
                             headers={"Authorization": f"Bearer {TOKEN}"})


async def test_a_wake_by_a_connection_past_the_quota_is_refused_with_53400(env, pooled):
    sleeper, _awake = await _one_live_one_standby(env)
    for port in (env.proxy.port, pooled.port):
        with pytest.raises(asyncpg.PostgresError) as info:  # asyncpg: the SQLSTATE of a refused startup
            await asyncpg.connect(host="127.0.0.1", port=port, user="sleeper", database="sleeper",
                                  password=sleeper.password, ssl=False, timeout=60)
        assert info.value.sqlstate == "53400", info.value
        assert "live databases" in str(info.value)
    assert env.fleet.get("sleeper").state == "standby"  # nothing was started


async def test_resume_and_ukc_start_past_the_quota_are_refused_with_4xx(env):
    await _one_live_one_standby(env)
    async with _api(env) as api:
        resp = await api.put("/v1/databases/sleeper/resume")
        assert resp.status_code == 429, resp.text
        assert resp.json()["code"] == "quota" and "live databases" in resp.json()["message"]
        resp = await api.put("/v1/instances/start", json=[{"name": "sleeper"}])
        item = resp.json()["data"]["instances"][0]  # UKC batches answer per item
        assert resp.json()["status"] == "error" and item["error"] == 429, resp.text
        assert "live databases" in item["message"]
    assert env.fleet.get("sleeper").state == "standby"


async def test_room_again_once_another_database_sleeps(env):
    await _one_live_one_standby(env)
    with pytest.raises(QuotaExceeded):
        await env.fleet.resume("sleeper")
    await env.fleet.suspend("awake")
    assert (await env.fleet.resume("sleeper")).state == "running"
