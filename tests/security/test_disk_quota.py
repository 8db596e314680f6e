"""Issue 10 item 8: disk_mb is really enforced. Over it, writes fail with Postgres' disk-full
error (53100); reads keep working; other databases are not affected; raising it heals."""

from __future__ import annotations

import psycopg
import pytest

from ..conftest import SANDBOX_SKIP

pytestmark = pytest.mark.skipif(SANDBOX_SKIP is not None, reason=f"SKIPPED LOUDLY: {SANDBOX_SKIP}")

FILL = "INSERT INTO big SELECT g, repeat(md5(g::text), 3200) FROM generate_series(1, 1500) g"  # ~150 MB


async def _connect(env, created):
    return await psycopg.AsyncConnection.connect(**env.conninfo(created.row.name, created.password),
                                                 autocommit=True)


async def test_disk_mb_is_enforced_and_raising_it_heals(env):
    limited = await env.fleet.create("limited", disk_mb=128)
    free = await env.fleet.create("free")
    async with await _connect(env, limited) as conn:
        await conn.execute("CREATE TABLE small AS SELECT 42 AS x")
        # uncompressed, out of line: every byte inserted reaches the disk
        await conn.execute("CREATE TABLE big (id int, v text); ALTER TABLE big ALTER v SET STORAGE EXTERNAL")
        with pytest.raises(psycopg.Error) as exc:
            await conn.execute(FILL)
        assert exc.value.sqlstate == "53100", f"{exc.value.sqlstate}: {exc.value}"
        cur = await conn.execute("SELECT x FROM small")  # reads go on
        assert (await cur.fetchone())[0] == 42
    async with await _connect(env, free) as conn:  # nobody else is affected
        await conn.execute("CREATE TABLE t AS SELECT repeat('y', 1000) FROM generate_series(1, 1000)")
    row = await env.fleet.update("limited", disk_mb=512)
    assert row.disk_mb == 512
    async with await _connect(env, limited) as conn:
        await conn.execute(FILL)  # fits now, without a restart
        cur = await conn.execute("SELECT count(*) FROM big")
        assert (await cur.fetchone())[0] == 1500


async def test_disk_mb_can_only_grow_and_needs_a_limit_from_the_start(env):
    from pgfleet.fleet.errors import InvalidRequest

    await env.fleet.create("limited", disk_mb=256)
    await env.fleet.create("free")
    with pytest.raises(InvalidRequest, match="only grow"):
        await env.fleet.update("limited", disk_mb=200)
    with pytest.raises(InvalidRequest, match="created"):
        await env.fleet.update("free", disk_mb=256)
    with pytest.raises(InvalidRequest, match="disk_mb must be"):
        await env.fleet.create("tiny", disk_mb=1)


async def test_a_tenant_flooding_its_log_is_rotated_within_a_cap(env):
    from pgfleet.drivers.sandbox import processes as sandbox

    created = await env.fleet.create("noisy")
    log_path = env.fleet.driver.log_path(env.fleet.spec(created.row))
    async with await _connect(env, created) as conn:
        await conn.execute(
            "DO $$ BEGIN FOR i IN 1..6000 LOOP RAISE WARNING '%', repeat('w', 8000); END LOOP; END $$")
    flood = 6000 * 8000
    assert flood > sandbox.LOG_MAX_BYTES
    import asyncio
    import time

    deadline = time.monotonic() + 5 * sandbox.LOG_CHECK_S + 10
    while log_path.stat().st_size > sandbox.LOG_MAX_BYTES // 2:  # the guard's next round
        assert time.monotonic() < deadline, "postgres.log was never rotated"
        await asyncio.sleep(0.1)
    rotated = log_path.with_name(log_path.name + ".1")
    assert rotated.stat().st_size <= sandbox.LOG_MAX_BYTES // 2
    assert rotated.stat().st_mode & 0o077 == 0


async def test_cpu_pct_caps_the_database_cgroup(env):
    from pgfleet.drivers import cgroups

    created = await env.fleet.create("capped", cpu_pct=50)
    spec = env.fleet.spec(created.row)
    cg = cgroups.Cgroup(env.fleet.driver.cgroup_parent, spec.uuid)
    if cg.v2:
        assert (cg.dirs["unified"] / "cpu.max").read_text().split() == ["50000", "100000"]
    else:
        assert int((cg.dirs["cpu"] / "cpu.cfs_quota_us").read_text()) == 50000
    async with await _connect(env, created) as conn:  # and it still serves
        cur = await conn.execute("SELECT 1")
        assert (await cur.fetchone())[0] == 1
