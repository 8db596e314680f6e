"""Branches on a copy-on-write store (XFS with reflinks, `pgfleet up --cow-image`): a branch
of now shares its parent's extents instead of copying them, and equals its parent."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pgfleet.drivers import cowstore
from pgfleet.fleet.branches import Backups, Branches

from .conftest import COW_SKIP, SANDBOX_SKIP, start_daemon, stop_daemon
from .test_branches import sql

pytestmark = [pytest.mark.skipif(SANDBOX_SKIP is not None, reason=f"SKIPPED LOUDLY: {SANDBOX_SKIP}"),
              pytest.mark.skipif(COW_SKIP is not None, reason=f"SKIPPED LOUDLY: {COW_SKIP}")]

TABLE_MB = 24


@pytest.fixture
async def cow_fb(cow_env):
    """cow_env with archiving on: (env, backups, branches)."""
    backups = Backups(cow_env.fleet, poll_s=3600)
    return cow_env, backups, Branches(cow_env.fleet, backups)


def used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def shared_extents(path: Path) -> tuple[int, int]:
    """(extents flagged shared, all extents) of a file, as filefrag -v reports them."""
    out = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True, check=True).stdout
    rows = [line for line in out.splitlines() if ":" in line and line.split(":")[0].strip().isdigit()]
    return sum("shared" in row for row in rows), len(rows)


def upper_file(env, name: str, relpath: str) -> Path:
    spec = env.fleet.spec(env.fleet.get(name))
    return env.fleet.driver.storage.layout(spec.home).upper / relpath


async def test_a_branch_shares_its_parents_extents_and_equals_it(cow_fb):
    env, _, branches = cow_fb
    parent = await env.fleet.create("big")
    await sql(env, "big", parent.password, "CREATE TABLE t(g int, pad text)")
    await sql(env, "big", parent.password, "INSERT INTO t SELECT g, md5(g::text) || repeat('x', 100) "
                                           "FROM generate_series(1, %s) g", (TABLE_MB * (1 << 20) // 170,))
    (relpath,) = (await sql(env, "big", parent.password, "SELECT pg_relation_filepath('t')"))[0]
    digest = "SELECT count(*), md5(string_agg(g::text || pad, ',' ORDER BY g)) FROM t"
    want = await sql(env, "big", parent.password, digest)
    store = cowstore.mount_point(env.home)
    before = used_bytes(store)

    made = await branches.branch("big", "big-copy")

    grown = used_bytes(store) - before
    # the table's file is cloned, not copied: its extents are shared with the parent's
    shared, extents = shared_extents(upper_file(env, "big-copy", relpath))
    assert extents and shared == extents, f"{shared} of {extents} extents shared"
    assert upper_file(env, "big-copy", relpath).stat().st_size >= TABLE_MB << 20
    # and the store did not grow by the table's size (WAL segments, pg_control: a few MB)
    assert grown < (TABLE_MB << 20) // 2, f"the store grew by {grown >> 20} MiB for a {TABLE_MB} MiB table"
    assert await sql(env, "big-copy", made.password, digest) == want
    # copy-on-write: a write in the branch leaves the parent's blocks alone
    await sql(env, "big-copy", made.password, "UPDATE t SET pad = 'changed' WHERE g <= 1000")
    assert await sql(env, "big", parent.password, digest) == want
    assert await sql(env, "big-copy", made.password, "SELECT count(*) FROM t WHERE pad = 'changed'") == [(1000,)]


def test_up_with_cow_image_makes_keeps_and_remounts_the_store(daemon_env):
    home = Path(daemon_env["PGFLEET_HOME"])
    d = start_daemon(home, daemon_env, extra=("--cow-image", "512M"))
    try:
        status = d.json("status")
        assert status["branch_storage"]["mode"] == "reflink"
        assert status["branch_storage"]["image"] == str(home / "cow.img")
        assert "branches: copy-on-write (reflink)" in d.cli("status").stdout
        assert cowstore.is_mounted(home / "cow") and (home / "instances").resolve() == home / "cow" / "instances"
        d.cli("db", "create", "shop")
        d.cli("db", "branch", "shop", "shop-pr1")
        uuid = d.json("db", "show", "shop-pr1")["uuid"]
        assert (home / "cow" / "instances" / uuid).is_dir()
    finally:
        stop_daemon(d)
    assert not cowstore.is_mounted(home / "cow")  # a clean stop leaves no mount behind
    # the next start mounts the store again without the flag: the image is the record
    d = start_daemon(home, daemon_env)
    try:
        assert d.json("status")["branch_storage"]["mode"] == "reflink"
        assert {db["name"] for db in d.json("db", "list")} == {"shop", "shop-pr1"}
        d.cli("db", "delete", "shop-pr1")
    finally:
        stop_daemon(d)
        cowstore.unmount(home)


@pytest.mark.parametrize("at_open", [1 << 20, (1 << 20) + 100])
def test_a_clone_stops_at_the_size_the_file_had_when_opened(tmp_path, at_open):
    """A tenant's file that grows while root copies it is cloned up to its size at open, block
    aligned (one clone) or not (the clone is refused: copy_file_range up to that size)."""
    from pgfleet.drivers.sandbox import safecopy

    home = tmp_path / "home"
    home.mkdir(mode=0o711)
    try:
        assert cowstore.prepare(home, 512 << 20).mode == "reflink"
        src, dst = home / "instances" / "src", home / "instances" / "dst"
        src.mkdir()
        dst.mkdir(mode=0o700)
        (src / "f").write_bytes(os.urandom(at_open))
        sfd, dfd = safecopy.open_dir(src), safecopy.open_dir(dst)
        try:
            fd, size = safecopy.open_regular("f", sfd)
            with open(src / "f", "ab") as grow:  # after the open: the tenant appends
                grow.write(b"x" * 8192)
            out = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dfd)
            try:
                assert safecopy.copy_fd(fd, out, size) == size
            finally:
                os.close(out)
                os.close(fd)
        finally:
            os.close(sfd)
            os.close(dfd)
        assert size == at_open and (dst / "f").read_bytes() == (src / "f").read_bytes()[:size]
        if at_open % 4096 == 0:
            shared, extents = shared_extents(dst / "f")
            assert shared == extents
    finally:
        cowstore.unmount(home)
