"""The connection proxy: Postgres v3 protocol in front of every database on this host.

It terminates TLS (routing by SNI), authenticates clients itself (SCRAM against the stored
verifier), routes them to a database, wakes a database in standby while holding the
client, and then either binds the client to its own server session (direct listener) or
pools server connections per transaction (pooled listener).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterator, Literal

from pgfleet.drivers.base import Backend
from pgfleet.fleet.errors import FleetError, NotFound, QuotaExceeded
from pgfleet.fleet.manager import Fleet
from pgfleet.pgwire import messages as m
from pgfleet.pgwire.protocol import SSL_ACCEPTED, SSL_REFUSED, BackendMsg, FrontendMsg, byte
from pgfleet.pgwire.scram import Verifier
from pgfleet.store import InstanceRow

from .auth import AuthFailed, cleartext_authenticate, scram_authenticate
from .cancel import CancelRegistry, CancelTarget
from .connect import BackendRefused, open_session
from .errors import ClientError
from .guards import Pending, ProxyGuards
from . import params as pm
from .pool import Pool, ServerRefused
from .pooled_client import PooledClient
from .relay import Relay, SessionActivity

log = logging.getLogger(__name__)

#: the whole unauthenticated phase (TLS, startup packet, SCRAM); None: the guards' limit
STARTUP_TIMEOUT_S: float | None = None
WAKE_TIMEOUT_S = 60.0
STREAM_LIMIT = 256 * 1024
#: client startup parameters that must not reach the backend as given
_NOT_FORWARDED = {"user", "database", "replication"}

Mode = Literal["session", "transaction"]

#: Finds a database that is not on this host: name -> (host, port) of the proxy that
#: serves it, or None. Set by fleet routing (Kubernetes); None on a single host.
RemoteResolver = Callable[[str], Awaitable[tuple[str, int] | None]]


@dataclass
class ProxyStats:
    connections: int = 0
    active: int = 0
    auth_failures: int = 0
    refused_limit: int = 0
    per_database: dict[str, int] = field(default_factory=dict)
    #: per database uuid, read on a metrics scrape
    auth_failures_by_db: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Origin:
    """How a connection reached the proxy when not on its own socket: tunnelled through
    another listener (pgfleet.edge's WebSocket), which terminated TLS and saw the host name."""

    tls: bool = False
    sni: str | None = None  # the host name the client asked for (TLS SNI or the tunnel's)
    #: a client that sent its password ahead of the request (the Neon driver's
    #: pipelineConnect) is asked for it in cleartext; otherwise SCRAM as usual
    cleartext_ok: bool = False
    #: the client's address as the tunnel saw it (pre-auth caps and login backoff count by
    #: it); None: each tunnelled connection is a source of its own
    peer: str | None = None


@dataclass
class Route:
    name: str
    how: Literal["sni", "endpoint", "database"]
    options: str | None  # the options parameter with routing words removed


class ProxyServer:
    def __init__(
        self, fleet: Fleet, host: str, port: int, remote: RemoteResolver | None = None, *,
        mode: Mode = "session", tls: ssl.SSLContext | None = None, domain: str = "db.localhost",
        guards: ProxyGuards | None = None,
    ) -> None:
        self.fleet = fleet
        self.remote = remote
        self.host = host
        self.port = port
        self.mode = mode
        self.tls = tls
        self.domain = domain.lower().strip(".")
        self.cancels = CancelRegistry()
        self.stats = ProxyStats()
        self.pools: dict[str, Pool] = {}
        #: direct sessions' relays by database uuid, and the bytes of those that ended
        self.relays: dict[str, set[Relay]] = {}
        self.relayed: dict[str, list[int]] = {}
        #: shared by every listener of a daemon: pre-auth caps, login backoff, pooler memory
        self.guards = guards if guards is not None else ProxyGuards()
        self.listener = "pooled" if mode == "transaction" else "direct"
        self._server: asyncio.base_events.Server | None = None
        self._clients: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_address=True, backlog=4096, limit=STREAM_LIMIT,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        for pool in self.pools.values():
            pool.close()

    # --- one client --------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.serve_connection(reader, writer)

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               origin: Origin | None = None) -> None:
        """One client connection, from its startup packet to its end (also the entry point of
        connections tunnelled from another listener, described by `origin`)."""
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        self.stats.connections += 1
        self.stats.active += 1
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await self._serve(reader, writer, origin)
        except ClientError as exc:
            await _send_error(writer, exc.sqlstate, str(exc), exc.detail)
        except m.ProtocolError as exc:
            await _send_error(writer, "08P01", f"protocol violation: {exc}")
        except ssl.SSLError as exc:
            log.debug("TLS handshake failed: %s", exc)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        except asyncio.CancelledError:
            await _send_error(writer, "57P01", "terminating connection: pgfleet is shutting down")
        except Exception:
            log.exception("proxy session failed")
            await _send_error(writer, "XX000", "internal error in the pgfleet proxy")
        finally:
            self.stats.active -= 1
            self._clients.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     origin: Origin | None = None) -> None:
        source = _source_address(writer, origin)
        pending = self.guards.pending.enter(source)
        try:
            timeout = STARTUP_TIMEOUT_S if STARTUP_TIMEOUT_S is not None else self.guards.limits.startup_timeout_s
            async with asyncio.timeout(timeout):  # no task per connection, unlike wait_for
                authed = await self._authenticate(reader, writer, origin, source, pending)
        finally:
            pending.leave()
        if authed is not None:
            await self._admitted(*authed, source, reader, writer)

    async def _authenticate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            origin: Origin | None, source: str, pending: Pending
                            ) -> tuple[m.StartupMessage, Route, InstanceRow] | None:
        """The unauthenticated phase: nothing here wakes a database or takes one of its
        connection slots. The authenticated client's startup, route and database; None when
        the connection was served whole (a CancelRequest, a database on another node)."""
        startup, tls_used = await self._handshake(reader, writer)
        tls_used = tls_used or (origin is not None and origin.tls)
        if isinstance(startup, m.CancelRequest):
            await self.cancels.cancel(startup.process_id, startup.secret_key)
            return None
        route = self._route(startup, writer, origin)
        row = self.fleet.find(route.name)
        if row is None and self.remote is not None and route.how == "database":
            target = await self.remote(route.name)
            if target is not None:
                pending.leave()  # the node that has the database authenticates and counts it
                await self._pass_through(startup, target, reader, writer)
                return None
        if row is None:
            raise ClientError("3D000", f'database "{route.name}" does not exist')
        if row.deleting:
            raise ClientError("57P03", f'database "{route.name}" is being deleted')
        if row.require_tls and not tls_used:
            raise ClientError("28000", f'database "{route.name}" requires an encrypted connection (sslmode=require)')
        pending.to_database(row.uuid)
        await self.authenticate_client(startup, row, source, reader, writer,
                                       cleartext=origin is not None and origin.cleartext_ok)
        return startup, route, row

    async def authenticate_client(self, startup: m.StartupMessage, row: InstanceRow, source: str,
                                  reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                  cleartext: bool = False) -> None:
        """SCRAM-SHA-256 (or a cleartext password sent ahead, for tunnels that allow it) of a
        client against its database's stored verifier, under the login backoff; raises
        ClientError 28P01 or 28000 (backing off), each an event with its source. Leaves
        AuthenticationOk to the caller."""
        user = startup.user
        logins = self.guards.logins
        try:
            logins.check(user, source)
        except ClientError:
            self.fleet.events.emit("connection_refused", row.name, reason="login backoff", user=user[:64],
                                   listener=self.listener, peer=source)
            raise
        verifier = Verifier.decode(row.verifier) if user == row.role else None
        try:
            if cleartext and _pipelined_password(reader):
                await cleartext_authenticate(reader, writer, verifier)
            else:
                await scram_authenticate(reader, writer, verifier)
        except AuthFailed as exc:
            failures = logins.failed(user, source)
            self.note_auth_failure(row, user, self.listener, source, reason=(str(exc) or "wrong password")[:200],
                                   failures=failures)
            raise ClientError("28P01", f'password authentication failed for user "{user}"')
        logins.succeeded(user, source)

    async def _admitted(self, startup: m.StartupMessage, route: Route, row: InstanceRow, source: str,
                        reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """An authenticated client: counted against its database's limit, then served."""
        limit = row.max_pooled_clients if self.mode == "transaction" else row.max_direct_clients
        current = self.stats.per_database.get(row.uuid, 0)
        if current >= limit:
            self.stats.refused_limit += 1
            self.fleet.events.emit("connection_refused", row.name, listener=self.listener, limit=limit, peer=source)
            raise ClientError("53300", f'too many {self.listener} connections for database "{row.name}" (limit {limit})')
        self.stats.per_database[row.uuid] = current + 1
        try:
            writer.write(m.authentication(m.AUTH_OK))
            async with self.fleet.lease(row.uuid):
                # only now, authenticated, may the client wake its database; no deadline of the
                # proxy's own: in a wake storm the start waits its turn in the fleet's queue
                # (never refused); each start is bounded by the driver
                backend = await self._wake(row.uuid)
                if self.mode == "transaction":
                    await self._pooled_session(startup, route, row, reader, writer)
                else:
                    await self._direct_session(startup, route, row, backend, reader, writer)
        finally:
            left = self.stats.per_database.get(row.uuid, 1) - 1
            if left:
                self.stats.per_database[row.uuid] = left
            else:
                self.stats.per_database.pop(row.uuid, None)

    def note_auth_failure(self, row: InstanceRow, user: str, listener: str, peer, **fields) -> None:
        """Count and report a failed login (also SQL over HTTP's, on the pooled listener's stats)."""
        self.stats.auth_failures += 1
        failures = self.stats.auth_failures_by_db
        failures[row.uuid] = failures.get(row.uuid, 0) + 1
        self.fleet.events.emit("auth_failure", row.name, user=user[:64], listener=listener, peer=peer, **fields)

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        tls_used = False
        while True:
            packet = await m.read_startup(reader)
            if isinstance(packet, m.SSLRequest):
                if self.tls is None or tls_used:
                    writer.write(SSL_REFUSED)
                    continue
                writer.write(SSL_ACCEPTED)
                await writer.drain()
                if reader._buffer:  # type: ignore[attr-defined]
                    raise m.ProtocolError("data after SSLRequest before the TLS handshake")
                await writer.start_tls(self.tls)
                tls_used = True
                continue
            if isinstance(packet, m.GSSENCRequest):
                writer.write(SSL_REFUSED)
                continue
            return packet, tls_used

    def _route(self, startup: m.StartupMessage, writer: asyncio.StreamWriter, origin: Origin | None = None) -> Route:
        if origin is not None:
            sni = origin.sni
        else:
            ssl_obj = writer.get_extra_info("ssl_object")
            sni = getattr(ssl_obj, "pgfleet_sni", None) if ssl_obj is not None else None
        return route(startup.params.get("options"), startup.database, sni, self.domain)

    async def _wake(self, uuid: str) -> Backend:
        try:
            return await self.fleet.ensure_running(uuid)
        except NotFound:
            raise ClientError("3D000", "database does not exist")
        except QuotaExceeded as exc:  # configuration_limit_exceeded: the host's quota, not this client
            raise ClientError("53400", str(exc))
        except FleetError as exc:
            raise ClientError("57P03", str(exc))

    def _tracks_transactions(self, row: InstanceRow) -> bool:
        """Follow each transaction only where an idle session may outlive a suspend (the
        `idle` policy, on a driver that keeps sessions); elsewhere an open session keeps its
        database up anyway and counts as busy for its whole life, at no cost per message."""
        return self.fleet.keeps_sessions_across_suspend and row.stz_policy == "idle"

    @contextlib.contextmanager
    def _starting(self, uuid: str) -> Iterator[None]:
        """A session being set up counts as busy: its database is never frozen under its
        startup exchange, which no relay watches yet (`idle` policy)."""
        self.fleet.session_busy(uuid, True)
        try:
            yield
        finally:
            self.fleet.session_busy(uuid, False)

    def close_idle_server_connections(self, uuid: str) -> None:
        """The database is being frozen (warm standby): its idle pooled server connections
        go, so their backends hold no memory while it is warm; the next transaction wakes
        the database and opens a new one."""
        pool = self.pools.get(uuid)
        if pool is not None:
            for conn in list(pool.idle):
                pool.discard(conn)

    def _activity(self, uuid: str) -> SessionActivity:
        fleet = self.fleet

        def before_forward():
            if fleet.is_up(uuid):
                return None
            return asyncio.ensure_future(fleet.ensure_running(uuid))

        return SessionActivity(lambda busy: fleet.session_busy(uuid, busy), before_forward)

    # --- direct: one server session per client ------------------------------------------
    async def _direct_session(
        self, startup: m.StartupMessage, route: Route, row: InstanceRow, backend: Backend,
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    ) -> None:
        params = {k: v for k, v in startup.params.items() if k not in _NOT_FORWARDED}
        if route.options is not None:
            params["options"] = route.options
        elif "options" in params:
            del params["options"]
        with self._starting(row.uuid):
            # frozen (warm standby) since the wake, while the client authenticated: thaw it
            backend = self.fleet.backend_of(row.uuid) or await asyncio.wait_for(self._wake(row.uuid), WAKE_TIMEOUT_S)
            params.update(user=row.role, database=backend.database)
            try:
                b_reader, b_writer, replies = await open_session(backend, params, WAKE_TIMEOUT_S)
            except BackendRefused as exc:  # the database's own error, as it sent it
                writer.write(m.message(BackendMsg.ERROR_RESPONSE, exc.body))
                raise ClientError("", "")
            key = self.cancels.mint()
            try:
                writer.write(self._startup_replies(replies, backend, key))
                relay = Relay(writer.transport, b_writer.transport, self._activity(row.uuid),  # type: ignore[arg-type]
                              track=self._tracks_transactions(row))
                relay.start(_take_buffer(reader), _take_buffer(b_reader))
            except BaseException:
                self.cancels.release(key)
                b_writer.close()
                raise
        try:
            live = self.relays.setdefault(row.uuid, set())
            live.add(relay)
            try:
                await relay.done
            finally:
                live.discard(relay)
                if not live:
                    self.relays.pop(row.uuid, None)
                if self.fleet.is_known(row.uuid):  # not deleted meanwhile
                    done = self.relayed.setdefault(row.uuid, [0, 0])
                    done[0] += relay.client_side.count
                    done[1] += relay.server_side.count
        finally:
            self.cancels.release(key)
            b_writer.close()

    def _startup_replies(self, replies: list[tuple[int, bytes]], backend: Backend, key: tuple[int, int]) -> bytes:
        """The backend's startup replies for the client, with our cancel key swapped in."""
        out = bytearray()
        for kind, body in replies:
            if kind == BackendMsg.BACKEND_KEY_DATA:
                pid, secret = struct.unpack("!ii", body[:8])
                self.cancels.bind(key, CancelTarget(backend, pid, secret))
                out += m.backend_key_data(*key)
            else:
                out += m.message(kind, body)
        return bytes(out)

    # --- pooled: server connections shared per transaction -------------------------------
    def pool_for(self, row: InstanceRow) -> Pool:
        pool = self.pools.get(row.uuid)
        if pool is None:
            uuid = row.uuid
            pool = self.pools[uuid] = Pool(row.name, row.role, row.pool_size,
                                           lambda: asyncio.ensure_future(self._wake(uuid)), self.guards)
        return pool

    async def _pooled_session(self, startup: m.StartupMessage, route: Route, row: InstanceRow,
                              reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._starting(row.uuid):
            client, key = await self._pooled_start(startup, route, row, reader, writer)
        try:
            await client.done
            if client.lingering is not None:  # the client's transport is closed when it is done
                await client.lingering
        finally:
            self.cancels.release(key)
            if not self._tracks_transactions(row):
                self.fleet.session_busy(row.uuid, False)

    async def _pooled_start(self, startup: m.StartupMessage, route: Route, row: InstanceRow,
                            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                            ) -> "tuple[PooledClient, tuple[int, int]]":
        pool = self.pool_for(row)
        if not pool.params:  # the first client learns the server's parameters for everyone
            conn = await pool.acquire()
            pool.release(conn)
        requested = _pooled_parameters(pool, startup, route)
        try:
            pset = await asyncio.wait_for(pool.client_params(requested), WAKE_TIMEOUT_S)
        except ServerRefused as exc:  # e.g. an invalid client_encoding: the server's own error
            raise ClientError(exc.fields.get("C", "22023"), str(exc), exc.fields.get("D"))
        except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
            raise ClientError("08006", f"could not set the session parameters: {str(exc) or 'timed out'}")
        key = self.cancels.mint()
        out = [m.parameter_status(k, v) for k, v in pool.startup_status(pset).items()]
        out += [m.backend_key_data(*key), m.ready_for_query()]
        writer.write(b"".join(out))
        fleet, uuid = self.fleet, row.uuid
        per_tx = self._tracks_transactions(row)
        client = PooledClient(pool, writer.transport,  # type: ignore[arg-type]
                              (lambda busy: fleet.session_busy(uuid, busy)) if per_tx else _no_busy, pset)
        backend = self.fleet.backend_of(row.uuid)

        def target() -> CancelTarget | None:
            current = client.cancel_target()
            b = self.fleet.backend_of(row.uuid) or backend
            return CancelTarget(b, *current) if current is not None and b is not None else None

        self.cancels.bind(key, target)
        if not per_tx:
            fleet.session_busy(uuid, True)
        client.start(_take_buffer(reader))
        return client, key

    async def _pass_through(self, startup: m.StartupMessage, target: tuple[str, int],
                            reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Hand the whole session to the proxy of the host that has the database: it
        authenticates and wakes as if the client had come to it directly."""
        try:
            r_reader, r_writer = await asyncio.open_connection(*target)
        except OSError as exc:
            raise ClientError("08006", f"could not reach the pgfleet node {target[0]}:{target[1]}: {exc}")
        try:
            r_writer.write(m.startup_message(startup.params))
            await _pipe(reader, writer, r_reader, r_writer)
        finally:
            r_writer.close()

    def forget_database(self, uuid: str) -> None:
        self.stats.auth_failures_by_db.pop(uuid, None)
        self.relayed.pop(uuid, None)
        pool = self.pools.pop(uuid, None)
        if pool is not None:
            pool.close()


def _pooled_parameters(pool: Pool, startup: m.StartupMessage, route: Route) -> dict[str, str]:
    """A pooled client's session parameters from its startup packet and `options`
    (`-c name=value`), by canonical name."""
    given = {k: v for k, v in startup.params.items()
             if k not in _NOT_FORWARDED and k != "options" and not k.startswith("_pq_.")}
    if route.options:
        try:
            given.update(pm.parse_options(route.options))
        except ValueError as exc:
            raise ClientError("0A000", f"the pooled listener cannot apply options: {exc}")
    out: dict[str, str] = {}
    for name, value in given.items():
        if not pm.check_name(name):
            raise ClientError("42704", f'unrecognized configuration parameter "{name}"')
        out[pool.registry.name_of(name)] = value
    return out


def route(options: str | None, database: str, sni: str | None, domain: str) -> Route:
    """Which database a client wants: by SNI (`<db>.<domain>`), then `options=endpoint=<db>`,
    then the database name. `domain` is lower case without dots at its ends."""
    endpoint, rest = _take_endpoint(options)
    if sni:
        sni = sni.lower().rstrip(".")
        suffix = "." + domain
        if sni.endswith(suffix) and "." not in sni[: -len(suffix)]:
            return Route(sni[: -len(suffix)], "sni", rest)
    if endpoint:
        return Route(endpoint, "endpoint", rest)
    return Route(database, "database", options)


def _pipelined_password(reader: asyncio.StreamReader) -> bool:
    """The client sent a PasswordMessage with its startup packet, before being asked."""
    return bytes(reader._buffer[:1]) == byte(FrontendMsg.PASSWORD)  # type: ignore[attr-defined]


def _take_endpoint(options: str | None) -> tuple[str | None, str | None]:
    """Neon-style `options=endpoint=<name>` (alone or among other words)."""
    if not options:
        return None, options
    words = options.split()
    endpoint = None
    kept = []
    for w in words:
        if w.startswith("endpoint="):
            endpoint = w.split("=", 1)[1]
        else:
            kept.append(w)
    return endpoint, (" ".join(kept) if kept else None)


def _source_address(writer: asyncio.StreamWriter, origin: Origin | None = None) -> str:
    """The client's address (no port): what pre-auth caps and login backoff count by."""
    if origin is not None:
        return origin.peer or f"tunnel-{id(writer):x}"
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "local"


def _no_busy(busy: bool) -> None:
    pass


def _take_buffer(reader: asyncio.StreamReader) -> bytes:
    """Bytes the stream had already read past the handshake (pipelining clients)."""
    buf = reader._buffer  # type: ignore[attr-defined]
    data = bytes(buf)
    buf.clear()
    return data


async def _pipe(c_reader, c_writer, b_reader, b_writer) -> None:
    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while True:
            data = await src.read(STREAM_LIMIT)
            if not data:
                break
            dst.write(data)
            await dst.drain()

    tasks = [asyncio.ensure_future(pump(c_reader, b_writer)), asyncio.ensure_future(pump(b_reader, c_writer))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _send_error(writer: asyncio.StreamWriter, sqlstate: str, text: str, detail: str | None = None) -> None:
    if not sqlstate or writer.is_closing():
        return
    try:
        writer.write(m.error_response(sqlstate, text, detail=detail))
        await asyncio.wait_for(writer.drain(), 1.0)
    except (ConnectionError, OSError, asyncio.TimeoutError):
        pass
