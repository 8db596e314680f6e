"""Issue 10 item 1: no way up inside Postgres. A hostile tenant holds its role's login and
tries every known road to superuser or to the server's programs and files; each must fail.
And no process running as the instance's uid may log in at all over its socket."""

from __future__ import annotations

import os
import subprocess

import psycopg
import pytest

from pgfleet.drivers.base import admin_connect
from pgfleet.drivers.roles import TENANT_ROLE_ATTRIBUTES, tenant_role_sql

from ..conftest import SANDBOX_SKIP

pytestmark = pytest.mark.skipif(SANDBOX_SKIP is not None, reason=f"SKIPPED LOUDLY: {SANDBOX_SKIP}")

ESCALATIONS = [
    "GRANT pg_execute_server_program TO shop",
    "GRANT pg_read_server_files TO shop",
    "GRANT pg_write_server_files TO shop",
    "GRANT pg_signal_backend TO shop",
    "COPY (SELECT 1) TO PROGRAM 'id'",
    "CREATE TABLE cp(x text); COPY cp FROM PROGRAM 'id'",
    "COPY (SELECT 1) TO '/tmp/pgfleet-tenant-was-here'",
    "CREATE TABLE rd(x text); COPY rd FROM '/etc/passwd'",
    "SELECT lo_import('/etc/passwd')",
    "SELECT lo_export(lo_create(0), '/tmp/pgfleet-tenant-was-here')",
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT pg_read_binary_file('postgresql.auto.conf')",
    "SELECT pg_ls_dir('.')",
    "ALTER ROLE shop SUPERUSER",
    "ALTER ROLE shop CREATEROLE",
    "ALTER ROLE shop REPLICATION",
    "ALTER ROLE shop BYPASSRLS",
    "CREATE ROLE helper LOGIN",
    "CREATE DATABASE other",
    "ALTER SYSTEM SET archive_command = 'id'",
    "SET ROLE postgres",
    "SET SESSION AUTHORIZATION postgres",
    "LOAD '/tmp/evil.so'",
    "SET log_min_messages = debug5",
    "SET temp_file_limit = -1",
]


async def _tenant(env):
    created = await env.fleet.create("shop")
    conn = await psycopg.AsyncConnection.connect(**env.conninfo("shop", created.password), autocommit=True)
    return created, conn


async def test_tenant_role_has_no_privilege_beyond_its_database(env):
    created, conn = await _tenant(env)
    async with conn:
        cur = await conn.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls, "
            "(SELECT count(*) FROM pg_auth_members m WHERE m.member = r.oid) FROM pg_roles r "
            "WHERE rolname = current_user")
        assert await cur.fetchone() == (False, False, False, False, False, 0)
        cur = await conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()")
        assert (await cur.fetchone())[0] == "shop", "the tenant owns its database"
        await conn.execute("CREATE TABLE mine(x int); INSERT INTO mine VALUES (1)")  # and uses it


async def test_every_escalation_fails(env):
    """One database, every road tried in turn (autocommit: a refused statement leaves the
    session usable); each must be refused with a privilege error, none may leave a trace."""
    created, conn = await _tenant(env)
    allowed = []
    async with conn:
        for sql in ESCALATIONS:
            try:
                await conn.execute(sql)
                allowed.append(sql)
            except psycopg.Error as exc:
                if exc.sqlstate not in ("42501", "42883", "58P01"):
                    allowed.append(f"{sql}: {exc.sqlstate} {exc}")
        cur = await conn.execute("SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = 'shop'")
        assert (await cur.fetchone())[0] is False
    assert allowed == [], "statements a tenant must not be able to run"
    assert not os.path.exists("/tmp/pgfleet-tenant-was-here")


async def test_the_tenant_cannot_rename_or_drop_its_database_away_from_its_routing(env):
    """The database inside carries the pgfleet database's name; the proxy always asks the
    server for that name (whatever the client's startup packet says). The tenant owns the
    database but cannot rename it (needs CREATEDB), drop it (it can reach no other database),
    close it to connections or pick another database to connect to."""
    created, conn = await _tenant(env)
    async with conn:
        expected = {
            "ALTER DATABASE shop RENAME TO elsewhere": "42501",  # renaming needs CREATEDB
            "DROP DATABASE shop": "55006",  # the open database; it can open no other
            "ALTER DATABASE shop ALLOW_CONNECTIONS false": "22023",  # not the current database
            "DROP DATABASE template1": "42501",
            "ALTER DATABASE template1 RENAME TO shop2": "42501",
        }
        refused = {}
        for sql in expected:
            with pytest.raises(psycopg.Error) as exc:
                await conn.execute(sql)
            refused[sql] = exc.value.sqlstate
        assert refused == expected
    # asking for another database lands in its own all the same
    for dbname in ("template1", "postgres"):
        async with await psycopg.AsyncConnection.connect(
                **{**env.conninfo("shop", created.password), "dbname": dbname, "options": "endpoint=shop"},
                autocommit=True) as other:
            cur = await other.execute("SELECT current_database()")
            assert await cur.fetchone() == ("shop",)
    backend = env.fleet.backend_of(created.row.uuid)
    assert backend.database == "shop"
    admin = await admin_connect(backend)
    try:
        assert await admin.scalar("SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_database") \
            == "shop,template0,template1"
    finally:
        await admin.close()


async def test_an_older_laxer_role_is_brought_down_by_the_one_role_function(env):
    """Databases made before this fix had CREATEROLE and may have granted themselves
    pg_execute_server_program: tenant_role_sql takes both away again."""
    created = await env.fleet.create("shop")
    backend = env.fleet.backend_of(created.row.uuid)
    conn = await admin_connect(backend)
    try:
        await conn.query("ALTER ROLE shop CREATEROLE CREATEDB; GRANT pg_execute_server_program TO shop")
        assert await conn.scalar("SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member "
                                 "WHERE r.rolname = 'shop'") == "1"
        await conn.query(tenant_role_sql("shop", "shop"))
        laxness = await conn.scalar(
            "SELECT concat_ws(',', rolcreaterole, rolcreatedb, rolsuper, "
            "(SELECT count(*) FROM pg_auth_members m WHERE m.member = r.oid)) "
            "FROM pg_roles r WHERE rolname = 'shop'")
    finally:
        await conn.close()
    assert "NOCREATEROLE" in TENANT_ROLE_ATTRIBUTES
    assert laxness == "f,f,f,0"


@pytest.mark.parametrize("user", ["postgres", "shop"])
async def test_the_instance_uid_cannot_log_in_over_its_own_socket(env, user):
    """The host's admin path is peer authentication mapped from root only: a process running
    as the instance's uid (its shell after any code execution) is refused for every role."""
    created = await env.fleet.create("shop")
    spec = env.fleet.spec(created.row)
    backend = env.fleet.backend_of(created.row.uuid)
    proc = env.fleet.driver.exec_as_tenant(
        spec, ["psql", "-X", "-h", backend.socket_dir, "-p", str(backend.port), "-U", user,
               "-d", "postgres", "-c", "SELECT 1"])
    assert proc.returncode != 0
    assert "authentication failed" in proc.stderr or "could not look up local user" in proc.stderr, proc.stderr
