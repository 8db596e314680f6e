"""The tenant's role and database, the same on every driver: one function builds each's SQL.

A tenant holds a Postgres login and must be assumed hostile. Its role owns its database and
schema `public` and nothing more: no SUPERUSER, no CREATEROLE (on PostgreSQL < 16 CREATEROLE
lets a role GRANT itself pg_execute_server_program and run programs), no CREATEDB (disk), no
REPLICATION, no BYPASSRLS, and no membership in any role (memberships are revoked, so a role
left over from an older, laxer version is brought down to this on its next personalise).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgfleet.pgwire.client import quote_ident, quote_literal

from .untrusted import write_root_file

if TYPE_CHECKING:
    from pgfleet.drivers.base import InstanceSpec

#: the database every template holds (initdb's), renamed after the pgfleet database in each
#: instance; an instance made before that rename still has it
TEMPLATE_DATABASE = "postgres"
#: where the host's superuser connects to rename the tenant's database (not while connected to it)
MAINTENANCE_DATABASE = "template1"

#: superuser and built-in roles a tenant's role may never be named after
RESERVED_ROLES = ("postgres",)
RESERVED_PREFIX = "pg_"

TENANT_ROLE_ATTRIBUTES = "LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB NOREPLICATION NOBYPASSRLS INHERIT"


def check_role_name(role: str) -> None:
    """Raise ValueError for a name that would be (or impersonate) a superuser or built-in role."""
    if role in RESERVED_ROLES or role.startswith(RESERVED_PREFIX) or not role:
        raise ValueError(f"role name {role!r} is reserved (superuser or built-in)")


def tenant_role_sql(role: str, database: str) -> str:
    """Idempotent SQL, run by the host's superuser connected to any database of the cluster,
    that makes `role` the tenant's role: it exists with exactly TENANT_ROLE_ATTRIBUTES, is a
    member of no role, and owns `database`. Schema public is owned by pg_database_owner
    (initdb's default since PostgreSQL 15), that is by the database's owner: the tenant. (It is
    not altered here: that would need a connection to the tenant's database, and would fail
    where the tenant dropped it.)"""
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
    )


def tenant_database_sql(database: str) -> str:
    """Idempotent SQL, run by the host's superuser connected to MAINTENANCE_DATABASE, that
    names the tenant's database `database` (the database inside carries the pgfleet database's
    name). The tenant's database is the cluster's one database that is not template0/template1:
    TEMPLATE_DATABASE in a fresh copy of the template or an instance made before this rename,
    the parent's name in a branch or a restore. The tenant cannot add one (NOCREATEDB); more or
    fewer than one is an error, never a guess. Renaming is a catalog update (~1 ms; a CREATE
    DATABASE from the template copies it: ~130 ms)."""
    lit = quote_literal(database)
    return (
        f"DO $pgfleet$ DECLARE d text; BEGIN "
        f"IF NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = {lit}) THEN "
        f"SELECT datname INTO STRICT d FROM pg_database WHERE datname NOT IN ('template0', 'template1'); "
        f"EXECUTE format('ALTER DATABASE %I RENAME TO %I', d, {lit}); "
        f"END IF; END $pgfleet$"
    )


def personalise_sql(role: str, database: str) -> str:
    """What makes a copy of the template (or of another instance) the tenant's, in one
    transaction, run by the host's superuser connected to MAINTENANCE_DATABASE: its database
    named `database`, and `role` the tenant's role owning it."""
    return tenant_database_sql(database) + ";" + tenant_role_sql(role, database)


class DatabaseNames:
    """The name of the tenant's database inside each instance, as last personalised: recorded in
    the instance's (root-owned) home and cached. An instance with no record was made before the
    database inside took the database's name: it holds TEMPLATE_DATABASE, and is reached there
    until a personalisation renames it."""

    RECORD = "database"

    def __init__(self) -> None:
        self._names: dict[str, str] = {}  # instance uuid -> name inside

    def inside(self, spec: "InstanceSpec") -> str:
        name = self._names.get(spec.uuid)
        if name is None:
            try:
                name = (spec.home / self.RECORD).read_text().strip() or TEMPLATE_DATABASE
            except FileNotFoundError:
                name = TEMPLATE_DATABASE
            self._names[spec.uuid] = name
        return name

    def renamed(self, spec: "InstanceSpec", name: str) -> None:
        """The database inside is now called `name` (personalise_sql ran)."""
        write_root_file(spec.home / self.RECORD, f"{name}\n")
        self._names[spec.uuid] = name

    def forget(self, spec: "InstanceSpec") -> None:
        """The instance is gone: its record too."""
        self._names.pop(spec.uuid, None)
        (spec.home / self.RECORD).unlink(missing_ok=True)
