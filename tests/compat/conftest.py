"""Real clients (psql, psycopg, asyncpg, SQLAlchemy, pgbench, node-postgres) through both
pgfleet listeners, the direct one and the pooled one.

One daemon per test module (it takes a few seconds to start); every test gets a `target`:
a listener of that daemon, parametrised over LISTENERS x SSLMODES, so every test runs in
plain text and over TLS ("verify-full" against the CA the daemon made on first start, its
`ca_file` in daemon.json, by the listener's IP address). Tests share one database per
module, so each one works in tables of its own (named after the test and the listener),
never in session state it did not create.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import SANDBOX_SKIP, Daemon, start_daemon, stop_daemon

LISTENERS = ("direct", "pooled")
SSLMODES = ("disable", "verify-full")
DBNAME = "compat"


@dataclass(frozen=True)
class Target:
    """One listener of the module's daemon, as a client would be told to reach it."""

    listener: str
    sslmode: str
    host: str
    port: int
    dbname: str
    user: str
    password: str
    sslrootcert: str | None = None

    @property
    def id(self) -> str:
        return f"{self.listener}_{self.sslmode}".replace("-", "_")

    def conninfo(self, **extra) -> dict:
        """Keyword arguments for psycopg.connect (libpq)."""
        kw = dict(host=self.host, port=self.port, dbname=self.dbname, user=self.user,
                  password=self.password, sslmode=self.sslmode, connect_timeout=30, **extra)
        if self.tls:
            kw["sslrootcert"] = self.sslrootcert
        return kw

    @property
    def tls(self) -> bool:
        return self.sslmode != "disable"

    def ssl_context(self):
        """For clients that take an SSLContext (asyncpg): False in plain text."""
        if not self.tls:
            return False
        import ssl

        ctx = ssl.create_default_context(cafile=self.sslrootcert)
        ctx.check_hostname = self.sslmode == "verify-full"
        return ctx

    def url(self, scheme: str = "postgresql", with_sslmode: bool = True) -> str:
        cred = f"{urllib.parse.quote(self.user)}:{urllib.parse.quote(self.password)}"
        url = f"{scheme}://{cred}@{self.host}:{self.port}/{self.dbname}"
        if not with_sslmode:
            return url
        url += f"?sslmode={self.sslmode}"
        return url + (f"&sslrootcert={urllib.parse.quote(self.sslrootcert)}" if self.tls else "")

    def libpq_env(self) -> dict:
        """The environment a libpq program (psql, pgbench) or node-postgres finds its server in."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGHOST=self.host, PGPORT=str(self.port), PGDATABASE=self.dbname, PGUSER=self.user,
                   PGPASSWORD=self.password, PGSSLMODE=self.sslmode, PGCONNECT_TIMEOUT="30",
                   PGAPPNAME="pgfleet-compat")
        if self.tls:
            env["PGSSLROOTCERT"] = self.sslrootcert
        return env


@dataclass
class CompatDaemon:
    daemon: Daemon
    password: str

    def target(self, listener: str, sslmode: str) -> Target:
        addr = self.daemon.info["listen" if listener == "direct" else "listen_pooled"]
        host, port = addr.rsplit(":", 1)
        ca = self.daemon.info.get("ca_file")
        if sslmode != "disable" and not ca:
            pytest.fail(f"sslmode={sslmode}, but the daemon has no TLS CA file (daemon.json: {self.daemon.info})")
        return Target(listener, sslmode, host, int(port), DBNAME, DBNAME, self.password, ca)


@pytest.fixture(scope="module")
def compat_daemon():
    if SANDBOX_SKIP:
        pytest.skip(f"SKIPPED LOUDLY: {SANDBOX_SKIP}")
    # not pytest's tmp dirs: per-database uids must pass through (see tests/conftest.py)
    tmp = Path(tempfile.mkdtemp(prefix="pgfleet-compat-", dir="/var/tmp"))
    os.chmod(tmp, 0o711)
    home = tmp / "home"
    env = dict(os.environ, PGFLEET_HOME=str(home), PGPASSFILE=str(tmp / "pgpass"))
    env.pop("PGPASSWORD", None)
    d = start_daemon(home, env)
    try:
        created = d.json("db", "create", DBNAME)
        yield CompatDaemon(d, created["password"])
    finally:
        stop_daemon(d)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(params=[(lst, ssl) for lst in LISTENERS for ssl in SSLMODES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def target(request, compat_daemon) -> Target:
    listener, sslmode = request.param
    return compat_daemon.target(listener, sslmode)


@pytest.fixture
def table(request, target) -> str:
    """A table name of this test and listener alone."""
    return f"t_{request.node.originalname.removeprefix('test_')}_{target.id}"[:63]
