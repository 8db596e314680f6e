"""The official Unikraft Cloud SDK (PyPI `unikraft-cloud`) drives a real pgfleet daemon.

Nothing is mocked: the SDK talks HTTP to `pgfleet up`, which runs real Postgres under
the sandbox driver, and psycopg connects through pgfleet's proxy.
"""

from __future__ import annotations

import base64
import warnings

import psycopg
import pytest
from unikraft_cloud import AlreadyExistsError, NotFoundError, RateLimitError, UnikraftCloud, UnikraftCloudError

from .conftest import QUOTA_INSTANCES

pytestmark = pytest.mark.timeout(300)

PASSWORD = "s3cret-pass-word"


@pytest.fixture
async def ukc(api_url, api_token, monkeypatch):
    # the SDK's own configuration path: UKC_METRO may be a full URL for a self-hosted deployment
    monkeypatch.setenv("UKC_METRO", api_url)
    monkeypatch.setenv("UKC_TOKEN", api_token)
    async with UnikraftCloud() as client:
        yield client


async def test_sdk_lifecycle_with_postgres(ukc, api_daemon):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the API warns that the env var FOO is recorded, not applied
        created = await ukc.instances.create(
            name="sdkdb", image="postgres:15", memory_mb=256, autostart=True, timeout_s=60,
            env={"POSTGRES_PASSWORD": PASSWORD, "FOO": "bar"},
            scale_to_zero={"policy": "on", "stateful": True, "cooldown_time_ms": 600_000},
        )
    assert created.name == "sdkdb" and created.uuid
    assert created.state == "running"
    assert created.image == "postgres:15"
    assert created.memory_mb == 256
    assert created.scale_to_zero.policy == "on" and created.scale_to_zero.stateful is True
    assert created.scale_to_zero.cooldown_time_ms == 600_000
    assert created.start_count == 1 and created.boot_time_us > 0
    assert created.env["POSTGRES_PASSWORD"] != PASSWORD  # never echoed back

    waited = await ukc.instances.get(name="sdkdb").wait(state="running", timeout_seconds=30)
    assert waited.state == "running"

    listed = await ukc.instances.list(details=True)
    assert [i.name for i in listed] == ["sdkdb"]
    got = await ukc.instances.get(uuid=created.uuid)
    assert got.name == "sdkdb" and got.uuid == created.uuid
    assert got.rss_bytes > 0 and got.nconns == 0  # metrics fields on the instance (SDK keeps extras)

    # the password given as POSTGRES_PASSWORD works through the proxy
    conninfo = dict(host="127.0.0.1", port=api_daemon.proxy_port, dbname="sdkdb", user="sdkdb",
                    password=PASSWORD, connect_timeout=60)
    async with await psycopg.AsyncConnection.connect(**conninfo) as conn:
        await conn.execute("CREATE TABLE t (v int)")
        await conn.execute("INSERT INTO t VALUES (42)")
        await conn.commit()

    metrics = await ukc.instances.get(name="sdkdb").metrics()
    assert metrics.rss_bytes > 0 and metrics.ntotal >= 1

    logs = await ukc.instances.get(name="sdkdb").logs(offset=0, limit=65536)
    assert b"database system is ready" in base64.b64decode(logs.output)

    services = await ukc.services.list()
    assert [s.name for s in services] == ["sdkdb-svc"]
    assert services[0].services[0].port == api_daemon.proxy_port
    vols = await ukc.volumes.list()
    assert [v.name for v in vols] == ["sdkdb-data"] and vols[0].attached_to[0].uuid == created.uuid
    quotas = await ukc.users.quotas()
    assert quotas[0].hard.instances == QUOTA_INSTANCES and quotas[0].used.instances == 1
    assert quotas[0].used.live_instances == 1 and quotas[0].used.live_memory_mb == 256

    # suspend: scaled to zero; a connection wakes it and the data is there
    suspended = await ukc.instances.get(name="sdkdb").suspend()
    assert suspended.previous_state == "running"
    await ukc.instances.get(name="sdkdb").wait(state="standby", timeout_seconds=30)
    assert (await ukc.instances.get(name="sdkdb")).state == "standby"
    async with await psycopg.AsyncConnection.connect(**conninfo) as conn:
        assert await (await conn.execute("SELECT v FROM t")).fetchall() == [(42,)]
    again = await ukc.instances.get(name="sdkdb")
    assert again.state == "running" and again.start_count == 2

    # stop: not woken by connections
    await ukc.instances.stop("sdkdb")
    stopped = await ukc.instances.get(name="sdkdb").wait(state="stopped", timeout_seconds=30)
    assert stopped.state == "stopped"
    with pytest.raises(psycopg.OperationalError):
        await psycopg.AsyncConnection.connect(**conninfo)
    assert (await ukc.instances.get(name="sdkdb")).state == "stopped"

    # patch
    await ukc.instances.get(name="sdkdb").update(memory_mb=320)
    assert (await ukc.instances.get(name="sdkdb")).memory_mb == 320

    # start again through the SDK, then delete
    await ukc.instances.start("sdkdb")
    assert (await ukc.instances.get(name="sdkdb")).state == "running"
    deleted = await ukc.instances.get(uuid=created.uuid).delete()
    assert deleted.uuid == created.uuid
    assert await ukc.instances.list() == []

    with pytest.raises(NotFoundError):
        await ukc.instances.get(name="sdkdb")
    with pytest.raises(NotFoundError):
        await ukc.instances.get(uuid=created.uuid).suspend()
    assert await ukc.instances.get(name="sdkdb").delete(missing_ok=True) is None


async def test_sdk_errors_conflict_and_quota(ukc, http):
    made = []
    try:
        first = await ukc.instances.create(name="qa", image={"url": "postgres:15"}, autostart=False)
        made.append(first.uuid)
        assert first.state == "stopped"
        with pytest.raises(AlreadyExistsError):
            await ukc.instances.create(name="qa", image="postgres:15", autostart=False)
        for i in range(1, QUOTA_INSTANCES):
            made.append((await ukc.instances.create(name=f"qa{i}", image="postgres:15", autostart=False)).uuid)
        with pytest.raises(RateLimitError) as exc:
            await ukc.instances.create(name="qa-over", image="postgres:15", autostart=False)
        assert "quota" in str(exc.value)
        with pytest.raises(UnikraftCloudError) as exc:
            await ukc.instances.create(name="bad", image="nginx:latest")
        assert exc.value.status == 400 and "postgres" in str(exc.value)
        assert len(await ukc.instances.list()) == QUOTA_INSTANCES
    finally:
        if made:
            await ukc.instances.delete([{"uuid": u} for u in made])
    assert await ukc.instances.list() == []
