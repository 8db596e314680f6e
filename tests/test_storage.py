"""Copy-on-write data directories (sandbox driver): a database created without a start owns
a few empty directories, its overlay is mounted only while it runs, its data survives
suspends, and `disk_bytes` counts only what it owns."""

from __future__ import annotations

import os

import psycopg
import pytest

from pgfleet.fleet.states import State

from .conftest import SANDBOX_SKIP

pytestmark = pytest.mark.skipif(SANDBOX_SKIP is not None, reason=f"SKIPPED LOUDLY: {SANDBOX_SKIP}")


async def connect(env, name, password):
    return await psycopg.AsyncConnection.connect(**env.conninfo(name, password), autocommit=True)


async def test_cold_create_then_first_connection_wakes_and_data_survives(env):
    fleet = env.fleet
    made = await fleet.create("cow", autostart=False)
    row = fleet.get("cow")
    assert row.state == State.STANDBY
    home = fleet.spec(row).home
    data = home / "data"
    assert (home / "upper").is_dir() and not os.path.ismount(data)
    fresh = await fleet.disk_bytes(row)
    assert fresh is not None and fresh < 64 * 1024, f"a fresh database owns {fresh} bytes"

    conn = await connect(env, "cow", made.password)  # wakes it; its role was made at this first start
    async with conn:
        assert os.path.ismount(data)
        cur = await conn.execute("SELECT current_user, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)")
        assert await cur.fetchone() == ("cow", False)
        await conn.execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 5000) g")
    await fleet.suspend("cow")
    assert not os.path.ismount(data), "standby holds no mount"
    used = await fleet.disk_bytes(fleet.get("cow"))
    assert fresh < used < 16 * 1024 * 1024, f"{used} bytes after one table"

    async with await connect(env, "cow", made.password) as conn:
        cur = await conn.execute("SELECT count(*) FROM t")
        assert (await cur.fetchone())[0] == 5000
    await fleet.delete("cow")
    assert not home.exists()


async def test_databases_share_the_template_but_not_their_writes(env):
    fleet = env.fleet
    a = await fleet.create("cow-a", autostart=False)
    b = await fleet.create("cow-b", autostart=False)
    async with await connect(env, "cow-a", a.password) as conn:
        await conn.execute("CREATE TABLE only_in_a (x int)")
    async with await connect(env, "cow-b", b.password) as conn:
        cur = await conn.execute("SELECT count(*) FROM pg_class WHERE relname = 'only_in_a'")
        assert (await cur.fetchone())[0] == 0
    # the shared lower layer never changed
    lower = fleet.driver.storage.lower
    assert not any(p.name == "only_in_a" for p in lower.rglob("*"))
