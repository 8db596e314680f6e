"""Hostile tenants against copy-on-write storage: the shared template layer is out of reach,
symlinks and file trees planted in a database's own layer cannot make the daemon follow
them or hang, and one client waking many databases at once gets every one served."""

from __future__ import annotations

import asyncio
import os
import subprocess

import psycopg
import pytest

from pgfleet.drivers.sandbox import storage

from ..conftest import SANDBOX_SKIP

pytestmark = pytest.mark.skipif(SANDBOX_SKIP is not None, reason=f"SKIPPED LOUDLY: {SANDBOX_SKIP}")


def as_uid(uid: int, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=30)


async def test_tenant_uid_cannot_reach_the_shared_template_layer(env):
    row = (await env.fleet.create("lowerx", autostart=False)).row
    lower = env.fleet.driver.storage.lower
    before = (lower / "PG_VERSION").read_bytes()
    uid = env.fleet.driver.uid_of(env.fleet.spec(row))
    for argv in (["cat", str(lower / "PG_VERSION")], ["sh", "-c", f"echo x >> {lower}/PG_VERSION"],
                 ["ls", str(lower)]):
        proc = as_uid(uid, *argv)
        assert proc.returncode != 0, f"{argv} as the tenant uid succeeded"
    assert (lower / "PG_VERSION").read_bytes() == before
    # nor another database's own layer
    other = (await env.fleet.create("lowery", autostart=False)).row
    upper = env.fleet.spec(other).home / "upper"
    assert as_uid(uid, "ls", str(upper)).returncode != 0


async def test_disk_bytes_never_follows_symlinks_the_tenant_plants(env):
    row = (await env.fleet.create("links", autostart=False)).row
    upper = env.fleet.spec(row).home / "upper"
    big = env.home / "host-big-file"
    with open(big, "wb") as f:
        f.write(os.urandom(4 << 20))  # 4 MiB the tenant does not own
    uid = env.fleet.driver.uid_of(env.fleet.spec(row))
    for name, target in (("to-root", "/"), ("to-big", str(big)), ("loop", ".")):
        os.symlink(target, upper / name)
        os.lchown(upper / name, uid, uid)
    os.mkfifo(upper / "fifo")
    used = await asyncio.wait_for(env.fleet.disk_bytes(env.fleet.get("links")), 10)
    assert used < 1 << 20, f"{used} bytes: a symlink was followed"


async def test_a_tree_of_many_files_cannot_stall_disk_bytes(env, monkeypatch):
    row = (await env.fleet.create("manyfiles", autostart=False)).row
    upper = env.fleet.spec(row).home / "upper"
    for i in range(300):
        (upper / f"f{i}").write_bytes(b"x")  # one block each
    full = await env.fleet.disk_bytes(env.fleet.get("manyfiles"))
    monkeypatch.setattr(storage, "MAX_WALK_ENTRIES", 100)
    # the walk stops at the bound (and so stays bounded in time whatever the tenant makes)
    bounded = await env.fleet.disk_bytes(env.fleet.get("manyfiles"))
    assert 0 < bounded <= full * 100 // 300 + 4096


async def test_one_client_waking_many_databases_at_once_gets_all_served(env):
    fleet = env.fleet
    made = [await fleet.create(f"wake{i}", autostart=False) for i in range(6)]

    async def client(i: int):
        c = made[i % len(made)]
        conn = await psycopg.AsyncConnection.connect(**env.conninfo(c.row.name, c.password), autocommit=True)
        async with conn:
            cur = await conn.execute("SELECT 1")
            return (await cur.fetchone())[0]

    results = await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(48))), 120)
    assert results == [1] * 48
    assert [fleet.get(c.row.name).start_count for c in made] == [1] * len(made), "one start per database"
