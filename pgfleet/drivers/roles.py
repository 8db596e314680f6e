"""The tenant's role, the same on every driver: one function builds its SQL.

A tenant holds a Postgres login and must be assumed hostile. Its role owns its database and
schema `public` and nothing more: no SUPERUSER, no CREATEROLE (on PostgreSQL < 16 CREATEROLE
lets a role GRANT itself pg_execute_server_program and run programs), no CREATEDB (disk), no
REPLICATION, no BYPASSRLS, and no membership in any role (memberships are revoked, so a role
left over from an older, laxer version is brought down to this on its next personalise).
"""

from __future__ import annotations

from pgfleet.pgwire.client import quote_ident, quote_literal

#: superuser and built-in roles a tenant's role may never be named after
RESERVED_ROLES = ("postgres",)
RESERVED_PREFIX = "pg_"

TENANT_ROLE_ATTRIBUTES = "LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB NOREPLICATION NOBYPASSRLS INHERIT"


def check_role_name(role: str) -> None:
    """Raise ValueError for a name that would be (or impersonate) a superuser or built-in role."""
    if role in RESERVED_ROLES or role.startswith(RESERVED_PREFIX) or not role:
        raise ValueError(f"role name {role!r} is reserved (superuser or built-in)")


def tenant_role_sql(role: str, database: str = "postgres") -> str:
    """Idempotent SQL, run by the host's superuser, that makes `role` the tenant's role:
    it exists with exactly TENANT_ROLE_ATTRIBUTES, is a member of no role, and owns
    `database` and its schema public."""
    check_role_name(role)
    r, lit = quote_ident(role), quote_literal(role)
    return (
        f"DO $pgfleet$ BEGIN "
        f"IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {lit}) THEN CREATE ROLE {r}; END IF; "
        f"END $pgfleet$;"
        f"ALTER ROLE {r} {TENANT_ROLE_ATTRIBUTES};"
        # memberships (e.g. pg_execute_server_program granted by an older CREATEROLE role)
        f"DO $pgfleet$ DECLARE g text; BEGIN "
        f"FOR g IN SELECT quote_ident(b.rolname) FROM pg_auth_members m "
        f"JOIN pg_roles b ON b.oid = m.roleid JOIN pg_roles u ON u.oid = m.member "
        f"WHERE u.rolname = {lit} LOOP EXECUTE 'REVOKE ' || g || ' FROM ' || {quote_literal(r)}; "
        f"END LOOP; END $pgfleet$;"
        f"ALTER DATABASE {quote_ident(database)} OWNER TO {r};"
        f"ALTER SCHEMA public OWNER TO {r};"
    )
