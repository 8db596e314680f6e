"""Hostile cases for archiving and branches (issue 14): a tenant that runs code as its uid
tampers with its spool and its data directory while root archives and copies them."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

from pgfleet.fleet.errors import AlreadyExists

from pgfleet.drivers import cowstore

from ..conftest import COW_SKIP, SANDBOX_SKIP
from ..test_branches import fb, sql  # noqa: F401  (fixture)
from ..test_branches_cow import cow_fb  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(SANDBOX_SKIP is not None, reason=f"SKIPPED LOUDLY: {SANDBOX_SKIP}")

SEG = "0000000100000000000000"  # + two hex digits: names the archiver would use


def as_tenant(env, name: str, script: str) -> None:
    row = env.fleet.get(name)
    proc = env.fleet.driver.exec_as_tenant(env.fleet.spec(row), ["sh", "-c", script])
    assert proc.returncode == 0, proc.stderr


async def test_a_tampered_spool_is_never_followed_or_trusted(fb):  # noqa: F811
    env, backups, _ = fb
    await env.fleet.create("victim")
    await env.fleet.create("evil")
    victim_control = env.fleet.driver.data_dir(env.fleet.spec(env.fleet.get("victim"))) / "global/pg_control"
    evil = env.fleet.get("evil")
    spool = env.fleet.driver.data_dir(env.fleet.spec(evil)) / "pgfleet_archive"
    as_tenant(env, "evil", f"cd {spool} && ln -s {victim_control} {SEG}99 && ln -s /etc/shadow {SEG}98 && "
                           f"mkfifo {SEG}9A && head -c 2097152 /dev/zero > {SEG}9B && echo short > {SEG}9C && "
                           f"ln -s /etc 00000009.history")
    repo = backups.repo(evil.uuid)
    # a FIFO would block a naive reader forever; a bounded wait proves it is not opened that way
    await asyncio.wait_for(env.fleet.driver.archive(env.fleet.spec(evil), repo, stopped=False), 30)
    archived = set(os.listdir(repo / "wal")) if (repo / "wal").exists() else set()
    assert not {f"{SEG}99", f"{SEG}98", f"{SEG}9A", f"{SEG}9B", f"{SEG}9C", "00000009.history"} & archived
    # the spool itself swapped for a symlink to another tenant's data: nothing is read through it
    as_tenant(env, "evil", f"rm -rf {spool} && ln -s {victim_control.parent.parent} {spool}")
    await asyncio.wait_for(env.fleet.driver.archive(env.fleet.spec(evil), repo, stopped=True), 30)
    assert not any(n.startswith("0000000100000000000000") and n[22:] in ("99", "98") for n in os.listdir(repo / "wal"))
    assert victim_control.exists()
    # a broken archiver (the tenant's) stalls no base backup: the host takes the WAL from pg_wal
    backup = await asyncio.wait_for(backups.take_base_backup("evil"), 120)
    assert (backup.path / "data" / "global" / "pg_control").exists()
    # and the next start makes it a real directory of the tenant's again
    await env.fleet.suspend("evil")
    await env.fleet.resume("evil")
    assert spool.is_dir() and not spool.is_symlink()


async def test_symlinks_and_fifos_in_the_data_dir_do_not_reach_a_branch(fb):  # noqa: F811
    await planted_files_do_not_reach_a_branch(*fb)


@pytest.mark.skipif(COW_SKIP is not None, reason=f"SKIPPED LOUDLY: {COW_SKIP}")
async def test_the_clone_path_follows_no_symlink_and_opens_no_fifo(cow_fb):  # noqa: F811
    """On a copy-on-write store each file is cloned (FICLONERANGE), not read: the same
    descriptor checks hold (O_NOFOLLOW, fstat regular, size at open)."""
    env, _, _ = cow_fb
    await planted_files_do_not_reach_a_branch(*cow_fb)
    assert cowstore.reflinks(env.home / "instances")


async def planted_files_do_not_reach_a_branch(env, _backups, branches) -> None:
    created = await env.fleet.create("src")
    data = env.fleet.driver.data_dir(env.fleet.spec(created.row))
    as_tenant(env, "src", f"cd {data} && ln -s /etc/shadow evil_link && ln -s /etc base/evil_dir && "
                          f"mkfifo evil_fifo && mkfifo base/1/999999")
    for name in ("src-run", "src-standby"):
        if name == "src-standby":
            await env.fleet.suspend("src")
        made = await asyncio.wait_for(branches.branch("src", name), 120)
        copy = env.fleet.driver.data_dir(env.fleet.spec(made.row))
        for planted in ("evil_link", "base/evil_dir", "evil_fifo", "base/1/999999"):
            assert not os.path.lexists(copy / planted), f"{planted} reached branch {name}"
        assert await sql(env, name, made.password, "SELECT 1") == [(1,)]


async def test_a_branch_never_takes_an_existing_name(fb):  # noqa: F811
    env, _, branches = fb
    a = await env.fleet.create("alpha")
    b = await env.fleet.create("beta")
    await sql(env, "beta", b.password, "CREATE TABLE mine AS SELECT 42 AS x")
    for name in ("beta", "alpha"):
        with pytest.raises(AlreadyExists):
            await branches.branch("alpha", name)
    assert await sql(env, "beta", b.password, "SELECT x FROM mine") == [(42,)]
    assert await sql(env, "alpha", a.password, "SELECT count(*) FROM pg_tables WHERE tablename = 'mine'") == [(0,)]


def test_branch_and_backup_routes_need_the_token(daemon):
    daemon.cli("db", "create", "shop")
    routes = [("POST", "/v1/databases/shop/branches", {"name": "stolen"}), ("GET", "/v1/databases/shop/backups", None),
              ("POST", "/v1/databases/shop/backups", None), ("DELETE", "/v1/databases/shop/backups", None),
              ("PATCH", "/v1/databases/shop/backups", {"retention_days": 1}),
              ("POST", "/v1/databases/shop/restore", {"at": "2026-01-01T00:00:00Z"})]
    with httpx.Client(base_url=daemon.info["api_url"], timeout=60) as anon:
        for method, path, body in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = anon.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (method, path, r.status_code)
    assert [d["name"] for d in daemon.json("db", "list")] == ["shop"]


async def test_a_role_already_named_like_the_branch_is_moved_aside(fb):  # noqa: F811
    """The parent's tenant role becomes the branch's; a role of the branch's name in the copy
    (not the tenant's to make: NOCREATEROLE, but a copy may hold one) keeps nothing of it."""
    from pgfleet.drivers.base import admin_connect

    env, _, branches = fb
    parent = await env.fleet.create("alpha")
    await sql(env, "alpha", parent.password, "CREATE TABLE mine AS SELECT 1 AS x")
    conn = await admin_connect(env.fleet.driver.backend(env.fleet.spec(env.fleet.get("alpha"))))
    try:
        await conn.query('CREATE ROLE "alpha-copy" NOLOGIN')
    finally:
        await conn.close()
    made = await branches.branch("alpha", "alpha-copy")
    assert await sql(env, "alpha-copy", made.password, "SELECT tableowner FROM pg_tables WHERE tablename = 'mine'") \
        == [("alpha-copy",)]
    roles = {r for (r,) in await sql(env, "alpha-copy", made.password, "SELECT rolname FROM pg_roles")}
    assert "alpha" not in roles and any(r.startswith("alpha-copy_") for r in roles)
