"""`pgfleet up`: one process on the host that runs the fleet, the proxies and the API."""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import logging
import os
import resource
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from pgfleet import __version__
from pgfleet.api.app import create_app, warm_routes
from pgfleet.api.common import ApiContext
from pgfleet.config import DaemonInfo, ensure_token, parse_hostport
from pgfleet.drivers import cowstore, make_driver, swap
from pgfleet.edge.settings import EdgeSettings
from pgfleet.fleet.manager import Fleet
from pgfleet.fleet.memory import MemoryManager
from pgfleet.fleet.errors import InvalidRequest
from pgfleet.fleet.quotas import Quotas
from pgfleet.overrides import OverrideError
from pgfleet.proxy.guards import GuardLimits, ProxyGuards
from pgfleet.proxy.server import ProxyServer
from pgfleet.store import Store

log = logging.getLogger("pgfleet")


@dataclass
class DaemonOptions:
    home: Path
    listen: str
    listen_pooled: str
    api: str
    driver: str = "auto"
    #: fleet routing (Kubernetes): a kubeconfig path or "in-cluster"; None on a single host
    kubeconfig: str | None = dataclasses.field(default_factory=lambda: os.environ.get("PGFLEET_KUBECONFIG") or None)
    #: TLS: a given certificate and key, else a local CA made on first start (unless off)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls: bool = True
    #: SNI routing: clients reach database NAME at NAME.<domain>
    domain: str = "db.localhost"
    #: this host's Node name, so routing never hands a session back to itself
    node_name: str | None = dataclasses.field(default_factory=lambda: os.environ.get("PGFLEET_K8S_NODE") or None)
    #: daemon.log lines: "text" or "json" (one object per line, events' fields under "event")
    log_format: str = "text"
    #: SQL over HTTP and WebSocket (pgfleet.edge); None: off
    listen_http: str | None = None
    http: EdgeSettings = dataclasses.field(default_factory=EdgeSettings)
    #: TLS on the HTTP listener: "on", "off", or "auto" (on unless it listens on loopback only)
    http_tls: str = "auto"
    #: warm standby: a swap file of this size (and zswap) made at start, removed at stop
    swap_bytes: int | None = None
    #: the fleet's memory budget (default: a share of host RAM)
    memory_budget_bytes: int | None = None
    #: branches by reflink on a host without XFS/btrfs: a sparse XFS image of this size made
    #: under the home for the databases' files (once; mounted again at every start)
    cow_image_bytes: int | None = None


class _Uvicorn(uvicorn.Server):
    """uvicorn inside our loop: the daemon, not uvicorn, owns the signals."""

    def install_signal_handlers(self) -> None:  # older uvicorn
        pass

    def capture_signals(self):  # newer uvicorn
        import contextlib

        return contextlib.nullcontext()


class AlreadyRunning(RuntimeError):
    pass


class ListenError(RuntimeError):
    """A listener could not be bound (one line for the user, no traceback)."""


class LimitsError(RuntimeError):
    """A quota or limit (file or environment) cannot be read (one line, no traceback)."""


def _load_limits(home: Path) -> tuple[Quotas, GuardLimits]:
    try:
        return Quotas.load(home), GuardLimits.load(home)
    except (InvalidRequest, OverrideError) as exc:
        raise LimitsError(str(exc)) from None


async def _start_listening(server, what: str, value: str) -> None:
    try:
        await server.start()
    except OSError as exc:
        raise ListenError(f"cannot listen on {value} ({what}): {(exc.strerror or str(exc)).lower()}") from None


def _bind_api(host: str, port: int, value: str) -> socket.socket:
    """The API's socket, bound here so that a busy port is one clear error (uvicorn's own
    bind logs and exits)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {value} (--api): {(exc.strerror or str(exc)).lower()}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _lock_home(home: Path) -> int:
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o711)
    fd = os.open(home / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(f"a pgfleet daemon is already running on {home}")
    return fd


#: files of the home that no instance uid may read: every tenant's SCRAM verifier, a log naming them
PRIVATE_FILES = ("state.db", "state.db-wal", "state.db-shm", "daemon.log")


def make_private(home: Path) -> None:
    """0600 for PRIVATE_FILES (SQLite gives its -wal/-shm the main file's mode)."""
    for name in PRIVATE_FILES:
        try:
            os.chmod(home / name, 0o600)
        except FileNotFoundError:
            pass


def setup_logging(home: Path, foreground: bool, log_format: str = "text") -> None:
    from pgfleet.logjson import formatter

    handlers: list[logging.Handler] = [logging.FileHandler(home / "daemon.log")]
    if foreground:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=os.environ.get("PGFLEET_LOG_LEVEL", "INFO"), handlers=handlers, force=True)


async def serve(opts: DaemonOptions, ready: asyncio.Future | None = None) -> None:
    lock_fd = _lock_home(opts.home)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    proxy_host, proxy_port = parse_hostport(opts.listen, "--listen")
    pooled_host, pooled_port = parse_hostport(opts.listen_pooled, "--listen-pooled")
    api_host, api_port = parse_hostport(opts.api, "--api")
    http_addr = parse_hostport(opts.listen_http, "--listen-http") if opts.listen_http else None
    token = ensure_token(opts.home)
    quotas, limits = _load_limits(opts.home)  # before anything changes: a bad value changes nothing

    branch_storage = cowstore.prepare(opts.home, opts.cow_image_bytes)  # before any database's file is touched
    swap_setup = swap.enable(opts.home / "swapfile", opts.swap_bytes) if opts.swap_bytes else None
    store = Store(opts.home / "state.db")
    make_private(opts.home)
    driver = make_driver(opts.driver, opts.home)
    fleet = Fleet(store, driver, opts.home, quotas=quotas)
    log.info("pgfleet %s starting on %s with the %s driver", __version__, opts.home, driver.name)
    await driver.prepare()
    await fleet.recover()
    if driver.supports_branches:
        from pgfleet.fleet.branches import Backups

        Backups(fleet).start()  # continuous archiving, base backups, retention
    warn_host_limits(opts.home, quotas)
    fleet.memory = MemoryManager(fleet, opts.memory_budget_bytes)
    fleet.memory.start()
    log.info("standby: %s; memory budget %.0f MiB", fleet.standby_status()["explain"],
             fleet.memory.budget_bytes / 2**20)

    routing = None
    if opts.kubeconfig:
        from pgfleet.k8s.routing import FleetRouting

        routing = FleetRouting(opts.kubeconfig, opts.node_name)
        log.info("fleet routing through the cluster (%s) as node %s", opts.kubeconfig, opts.node_name)
    tls_ctx, ca_file = _tls(opts, [proxy_host, pooled_host] + ([http_addr[0]] if http_addr else []))
    # pre-auth caps, login backoff and pooler memory: one set for both listeners
    guards = ProxyGuards(limits=limits)
    direct = ProxyServer(fleet, proxy_host, proxy_port, remote=routing.direct if routing else None,
                         mode="session", tls=tls_ctx, domain=opts.domain, guards=guards)
    pooled = ProxyServer(fleet, pooled_host, pooled_port, remote=routing.pooled if routing else None,
                         mode="transaction", tls=tls_ctx, domain=opts.domain, guards=guards)
    fleet.on_delete.append(pooled.forget_database)
    fleet.on_delete.append(direct.forget_database)
    fleet.on_freeze.append(pooled.close_idle_server_connections)
    fleet.before_freeze.append(direct.direct.open_spare)
    await _start_listening(direct, "--listen", opts.listen)
    await _start_listening(pooled, "--listen-pooled", opts.listen_pooled)
    edge = None
    if http_addr is not None:
        from pgfleet.edge.server import EdgeServer

        http_tls = opts.http_tls == "on" or (opts.http_tls == "auto" and not _loopback(http_addr[0]))
        if http_tls and tls_ctx is None:
            raise ValueError("--http-tls needs the proxies' TLS (do not combine it with --no-tls)")
        edge = EdgeServer(fleet, direct, pooled, *http_addr, tls=tls_ctx if http_tls else None, domain=opts.domain,
                          settings=opts.http)
        await _start_listening(edge, "--listen-http", opts.listen_http or "")
    api_sock = _bind_api(api_host, api_port, opts.api)
    public_host = proxy_host if proxy_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    if routing is not None:
        routing.own |= {(public_host, direct.port), (public_host, pooled.port)}
    ctx = ApiContext(
        fleet=fleet, token=token, public_host=public_host, port=direct.port, pooled_port=pooled.port,
        driver=driver.name, home=str(opts.home), ca_file=str(ca_file) if ca_file else None, domain=opts.domain,
        proxy_stats=lambda: {"direct": dataclasses.asdict(direct.stats), "pooled": dataclasses.asdict(pooled.stats),
                             "guards": guards.stats()},
        proxies={"direct": direct, "pooled": pooled}, branch_storage=branch_storage.to_json(),
    )
    app = create_app(ctx)
    await warm_routes(app, token)
    api = _Uvicorn(uvicorn.Config(
        app, host=api_host, port=api_port, log_level="warning", lifespan="off",
        access_log=False, timeout_graceful_shutdown=2,
    ))
    api_task = asyncio.create_task(api.serve(sockets=[api_sock]))
    while not api.started:
        if api_task.done():
            await api_task  # raises the bind error
            raise RuntimeError("the API server stopped during start")
        await asyncio.sleep(0.01)
    api_port = api.servers[0].sockets[0].getsockname()[1]
    info = DaemonInfo(
        pid=os.getpid(), api_url=f"http://{api_host}:{api_port}", listen=f"{public_host}:{direct.port}",
        listen_pooled=f"{public_host}:{pooled.port}", driver=driver.name, version=__version__,
        ca_file=str(ca_file) if ca_file else None, domain=opts.domain, tls=tls_ctx is not None,
        listen_http=f"{http_addr[0] if http_addr[0] not in ('0.0.0.0', '::', '') else '127.0.0.1'}:{edge.port}"
        if edge is not None and http_addr is not None else None,
        http_tls=edge is not None and edge.tls is not None,
    )
    info.write(opts.home)
    from pgfleet import daemon_config

    daemon_config.save(opts.home, {  # a plain `pgfleet up` comes back on these listeners
        "listen": _hostport(proxy_host, direct.port), "listen_pooled": _hostport(pooled_host, pooled.port),
        "api": _hostport(api_host, api_port), "driver": opts.driver, "domain": opts.domain, "tls": opts.tls,
        "tls_cert": str(opts.tls_cert) if opts.tls_cert else None,
        "tls_key": str(opts.tls_key) if opts.tls_key else None, "log_format": opts.log_format,
        "listen_http": _hostport(http_addr[0], edge.port) if edge is not None and http_addr is not None else "off",
        "http_tls": opts.http_tls, "ws_session": opts.http.ws_session,
        "http_max_request_mb": opts.http.max_request_bytes >> 20, "http_max_response_mb": opts.http.max_response_bytes >> 20,
    })
    log.info("serving: proxy %s, pooled %s, API %s", info.listen, info.listen_pooled, info.api_url)
    if ready is not None and not ready.done():
        ready.set_result(info)
    try:
        await stop.wait()
    finally:
        log.info("shutting down: suspending running databases")
        DaemonInfo.path(opts.home).unlink(missing_ok=True)
        if edge is not None:
            await edge.close()
        await direct.close()
        await pooled.close()
        api.should_exit = True
        if fleet.backups is not None:
            await fleet.backups.close()
        await fleet.memory.close()
        await fleet.shutdown()
        if swap_setup is not None:
            swap_setup.undo()  # the host as it was (no frozen database is left to need it)
        if branch_storage.image is not None:
            cowstore.unmount(opts.home)  # every database is suspended: nothing holds it (kept if something does)
        await api_task
        if routing is not None:
            await routing.close()
        store.close()
        os.close(lock_fd)
        log.info("stopped")


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tls(opts: DaemonOptions, hosts: list[str]):
    """The proxies' TLS context and the CA file clients should trust (None if user-given)."""
    from pgfleet.proxy.tls import TlsFiles, ensure_local_ca, server_context

    if opts.tls_cert or opts.tls_key:
        if not (opts.tls_cert and opts.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        return server_context(TlsFiles(opts.tls_cert, opts.tls_key, None)), None
    if not opts.tls:
        return None, None
    names = [h for h in hosts if h not in ("0.0.0.0", "::", "")]
    files = ensure_local_ca(opts.home / "tls", opts.domain, names)
    return server_context(files), files.ca


def warn_host_limits(home: Path, quotas: Quotas) -> None:
    """A clear warning for each host limit too low for the configured quotas."""
    from pgfleet import hostlimits

    for problem in hostlimits.problems(hostlimits.checks(home, quotas.instances, quotas.live_instances)):
        log.warning("this host cannot hold the configured fleet: %s", problem)


def raise_open_files_limit() -> int:
    """Every client connection is a file descriptor (two on the direct listener): lift the
    soft limit (often 1,024 under systemd) to the hard one. Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open files limit from %d: %s", soft, exc)
    return soft


def run(opts: DaemonOptions, foreground: bool = True) -> None:
    opts.home.mkdir(parents=True, exist_ok=True)
    setup_logging(opts.home, foreground, opts.log_format)
    log.info("open files limit: %d", raise_open_files_limit())
    if opts.driver == "auto":
        from pgfleet.drivers import resolve_auto

        opts.driver = resolve_auto()
    try:
        import uvloop
    except ImportError:
        uvloop = None
    # qemu.qmp hands file descriptors to QEMU over its socket (SCM_RIGHTS), which uvloop's
    # transports do not expose: the microvm driver runs on the standard event loop.
    if uvloop is None or opts.driver == "microvm":
        asyncio.run(serve(opts))
    else:
        uvloop.run(serve(opts))
