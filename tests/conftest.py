"""Shared fixtures: real Postgres (sandbox driver), real sockets, real daemons."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pgfleet.drivers.pgbin import find_postgres

REPO = Path(__file__).resolve().parent.parent
PGFLEET = [sys.executable, "-m", "pgfleet.cli.main"]


def _sandbox_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the sandbox driver needs root (namespaces, cgroups, per-database uids): run the suite as root"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed: run `make deps`"
    try:
        find_postgres()
    except Exception as exc:
        return f"no PostgreSQL server binaries: {exc}"
    return None


SANDBOX_SKIP = _sandbox_unavailable()
needs_sandbox = pytest.mark.skipif(SANDBOX_SKIP is not None, reason=f"SKIPPED LOUDLY: {SANDBOX_SKIP}")


def traversable(path: Path) -> Path:
    """Let per-database uids pass through pytest's private (0700) temporary directories,
    as they pass through a real pgfleet home (0711)."""
    path.mkdir(parents=True, exist_ok=True)
    p = path
    while p != p.parent:
        if p.stat().st_mode & 0o001 == 0:
            os.chmod(p, p.stat().st_mode | 0o011)
        p = p.parent
    return path


@pytest.fixture
def tmp_path():
    """A private temporary directory that per-database uids can pass through.

    Not pytest's own: concurrent pytest sessions reset /tmp/pytest-of-<user> to 0700."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="pgfleet-test-", dir="/var/tmp"))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Env:
    """An in-process fleet on the sandbox driver with a proxy on a free port."""

    home: Path
    fleet: object
    proxy: object

    def conninfo(self, name: str, password: str, **extra) -> dict:
        return dict(host="127.0.0.1", port=self.proxy.port, dbname=name, user=name, password=password,
                    connect_timeout=60, **extra)


@pytest.fixture
async def env(tmp_path):
    async with _fleet_env(tmp_path) as e:
        yield e


#: a copy-on-write store (XFS with reflinks) needs mkfs.xfs; without it these tests skip loudly
COW_SKIP = None if shutil.which("mkfs.xfs") else "mkfs.xfs (xfsprogs) is not installed: run `make deps`"


@pytest.fixture
async def cow_env(tmp_path):
    """env with the databases' files on a copy-on-write store (pgfleet up --cow-image)."""
    if COW_SKIP:
        pytest.skip(f"SKIPPED LOUDLY: {COW_SKIP}")
    async with _fleet_env(tmp_path, cow_image_bytes=512 << 20) as e:
        yield e


@contextlib.asynccontextmanager
async def _fleet_env(tmp_path: Path, cow_image_bytes: int | None = None):
    if SANDBOX_SKIP:
        pytest.skip(f"SKIPPED LOUDLY: {SANDBOX_SKIP}")
    from pgfleet.drivers import cowstore
    from pgfleet.drivers.sandbox.driver import SandboxDriver
    from pgfleet.fleet.manager import Fleet
    from pgfleet.proxy.server import ProxyServer
    from pgfleet.store import Store

    home = tmp_path / "home"
    home.mkdir()
    os.chmod(home, 0o711)
    if cow_image_bytes is not None:
        assert cowstore.prepare(home, cow_image_bytes).mode == "reflink"
    store = Store(home / "state.db")
    fleet = Fleet(store, SandboxDriver(home / "sandbox"), home)
    try:
        await fleet.driver.prepare()
        await fleet.recover()
        proxy = ProxyServer(fleet, "127.0.0.1", 0)
        fleet.on_delete.append(proxy.forget_database)
        fleet.before_freeze.append(proxy.direct.open_spare)  # as the daemon wires it
        await proxy.start()
        try:
            yield Env(home, fleet, proxy)
        finally:
            await proxy.close()
            for row in fleet.list():
                await fleet.delete(row.uuid)
            await fleet.shutdown()
            store.close()
    finally:
        if cow_image_bytes is not None:
            cowstore.unmount(home)


@contextlib.contextmanager
def fleet_on_own_loop(prefix: str):
    """A sandbox fleet on an event loop of its own, for module-scoped fixtures of hypothesis
    tests (which call the test many times, outside pytest-asyncio's per-test loop). Yields
    (loop, fleet); shuts the fleet down and removes its home afterwards."""
    if SANDBOX_SKIP:
        pytest.skip(f"SKIPPED LOUDLY: {SANDBOX_SKIP}")
    import asyncio
    import tempfile

    from pgfleet.drivers.sandbox.driver import SandboxDriver
    from pgfleet.fleet.manager import Fleet
    from pgfleet.store import Store

    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    os.chmod(root, 0o711)
    loop = asyncio.new_event_loop()
    fleet = Fleet(Store(root / "state.db"), SandboxDriver(root / "sandbox"), root)
    try:
        loop.run_until_complete(fleet.driver.prepare())
        yield loop, fleet
    finally:
        loop.run_until_complete(fleet.shutdown())
        loop.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def pooled(env):
    """A pooled (transaction mode) listener beside env's direct one."""
    from pgfleet.proxy.server import ProxyServer

    server = ProxyServer(env.fleet, "127.0.0.1", 0, mode="transaction")
    await server.start()
    env.fleet.on_delete.append(server.forget_database)
    yield server
    await server.close()


@dataclass
class Daemon:
    home: Path
    info: dict
    env: dict

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run([*PGFLEET, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"pgfleet {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def json(self, *args: str):
        return json.loads(self.cli(*args, "--json").stdout)

    @property
    def proxy_port(self) -> int:
        return int(self.info["listen"].rsplit(":", 1)[1])


def start_daemon(home: Path, env: dict, like: "Daemon | None" = None, driver: str = "sandbox",
                 extra: tuple[str, ...] = ()) -> Daemon:
    """Start a daemon on free ports, or on the same ports as `like` (a restart); `extra`: more
    `pgfleet up` flags."""
    listen, pooled, api, http = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
    if like is not None:
        listen, pooled = like.info["listen"], like.info["listen_pooled"]
        http = like.info.get("listen_http") or http
        api = like.info["api_url"].removeprefix("http://")
    proc = subprocess.run(
        [*PGFLEET, "up", "--detach", "--home", str(home), "--driver", driver,
         "--listen", listen, "--listen-pooled", pooled, "--api", api, "--listen-http", http, *extra],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, f"pgfleet up --detach failed: {proc.stderr}"
    info = json.loads((home / "daemon.json").read_text())
    return Daemon(home, info, env)


@pytest.fixture
def daemon_env(tmp_path) -> dict:
    if SANDBOX_SKIP:
        pytest.skip(f"SKIPPED LOUDLY: {SANDBOX_SKIP}")
    home = tmp_path / "pgfleet-home"
    env = dict(os.environ, PGFLEET_HOME=str(home), PGPASSFILE=str(tmp_path / "pgpass"))
    env.pop("PGPASSWORD", None)
    return env


@pytest.fixture
def daemon(daemon_env):
    d = start_daemon(Path(daemon_env["PGFLEET_HOME"]), daemon_env)
    try:
        yield d
    finally:
        stop_daemon(d)


def stop_daemon(d: Daemon) -> None:
    info_path = d.home / "daemon.json"
    if info_path.exists():
        subprocess.run([*PGFLEET, "down", "--home", str(d.home)], env=d.env, capture_output=True, timeout=180)
    # whatever the test did, leave no postgres of this home behind
    for pid in postmasters_under(d.home):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def postmasters_under(home: Path) -> list[int]:
    """Host pids of postgres processes whose working directory is inside `home`."""
    root = os.path.realpath(home)
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry.name}/cwd")
            comm = Path(f"/proc/{entry.name}/comm").read_text().strip()
        except OSError:
            continue
        if comm == "postgres" and cwd.startswith(root + "/"):
            pids.append(int(entry.name))
    return pids


async def startup_error(port: int, params: dict) -> dict[str, str]:
    """Send a startup message to a proxy; return the fields of the ErrorResponse it answers with."""
    import asyncio

    from pgfleet.pgwire import messages as m
    from pgfleet.pgwire.protocol import BackendMsg

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(m.startup_message(params))
    kind, body = await m.read_message(reader)
    writer.close()
    assert kind == BackendMsg.ERROR_RESPONSE, f"expected an ErrorResponse, got {kind!r}"
    return m.parse_error_fields(body)
