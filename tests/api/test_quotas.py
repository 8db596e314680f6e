"""Quota limits: where they come from, and that the fleet enforces them on create."""

from __future__ import annotations

import json

import pytest

from pgfleet.fleet.errors import InvalidRequest, QuotaExceeded
from pgfleet.fleet.quotas import Quotas


def test_limits_from_defaults_file_and_environment(tmp_path):
    assert Quotas.load(tmp_path, environ={}) == Quotas()
    (tmp_path / "quotas.json").write_text(json.dumps({"instances": 7, "live_memory_mb": 4096}))
    assert Quotas.load(tmp_path, environ={}) == Quotas(instances=7, live_memory_mb=4096)
    env = {"PGFLEET_QUOTA_INSTANCES": "3", "PGFLEET_QUOTA_LIVE_INSTANCES": "2"}
    assert Quotas.load(tmp_path, environ=env) == Quotas(instances=3, live_instances=2, live_memory_mb=4096)
    with pytest.raises(InvalidRequest):
        Quotas.load(tmp_path, environ={"PGFLEET_QUOTA_INSTANCES": "many"})
    with pytest.raises(InvalidRequest):
        Quotas.load(tmp_path, environ={"PGFLEET_QUOTA_LIVE_MEMORY_MB": "-1"})


async def test_fleet_refuses_a_create_over_quota_and_keeps_nothing(env):
    env.fleet.quotas = Quotas(instances=2, live_instances=1, live_memory_mb=1024)
    await env.fleet.create("q1", memory_mb=128)
    with pytest.raises(QuotaExceeded, match="live"):
        await env.fleet.create("q2", memory_mb=128)  # a second live database
    await env.fleet.suspend("q1")  # standby holds no memory: room again
    await env.fleet.create("q2", memory_mb=128, policy="off")
    with pytest.raises(QuotaExceeded, match="databases exist"):
        await env.fleet.create("q3", memory_mb=128)
    assert sorted(r.name for r in env.fleet.list()) == ["q1", "q2"]
    await env.fleet.stop("q2")
    with pytest.raises(QuotaExceeded, match="memory"):
        env.fleet.quotas.check_start(env.fleet, 2048)
