"""The connection proxy: Postgres v3 protocol in front of every database on this host.

It terminates TLS (routing by SNI), authenticates clients itself (SCRAM against the stored
verifier), routes them to a database, wakes a database in standby while holding the
client, and then either binds the client to its own server session (direct listener) or
pools server connections per transaction (pooled listener).

ProxyServer is the listener: it accepts, admits and counts connections. The parts it
hands a connection to: login.py (the unauthenticated phase), routing.py (which database),
direct.py and pooled.py (the two kinds of session), sessions.py (what they share).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Awaitable, Callable, Literal

from pgfleet.fleet.manager import Fleet
from pgfleet.pgwire import messages as m
from pgfleet.store import InstanceRow

from . import sessions
from .cancel import CancelRegistry
from .direct import DirectSessions
from .errors import ClientError
from .guards import Pending, ProxyGuards
from .login import Login, handshake
from .pool import Pool
from .pooled import PooledSessions
from . import routing
from .routing import Origin, Route, source_address
from .stats import ProxyStats

log = logging.getLogger(__name__)

#: the whole unauthenticated phase (TLS, startup packet, SCRAM); None: the guards' limit
STARTUP_TIMEOUT_S: float | None = None
STREAM_LIMIT = 256 * 1024

Mode = Literal["session", "transaction"]

#: Finds a database that is not on this host: name -> (host, port) of the proxy that
#: serves it, or None. Set by fleet routing (Kubernetes); None on a single host.
RemoteResolver = Callable[[str], Awaitable[tuple[str, int] | None]]


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
        #: shared by every listener of a daemon: pre-auth caps, login backoff, pooler memory
        self.guards = guards if guards is not None else ProxyGuards()
        self.listener = "pooled" if mode == "transaction" else "direct"
        self.login = Login(fleet.events, self.guards.logins, self.stats, self.listener)
        self.direct = DirectSessions(fleet, self.cancels)
        self.pooled = PooledSessions(fleet, self.cancels, self.guards)
        # read by metrics (stats.traffic) and tests: the parts' own tables
        self.pools = self.pooled.pools
        self.relays = self.direct.relays
        self.relayed = self.direct.relayed
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
        self.pooled.close()
        self.direct.spares.close_all()

    def pool_for(self, row: InstanceRow) -> Pool:
        return self.pooled.pool_for(row)

    def close_idle_server_connections(self, uuid: str) -> None:
        self.pooled.close_idle_server_connections(uuid)

    def forget_database(self, uuid: str) -> None:
        self.stats.auth_failures_by_db.pop(uuid, None)
        self.direct.forget(uuid)
        self.pooled.forget(uuid)

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
        source = source_address(writer, origin)
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
        startup, tls_used = await handshake(reader, writer, self.tls)
        tls_used = tls_used or (origin is not None and origin.tls)
        if isinstance(startup, m.CancelRequest):
            await self.cancels.cancel(startup.process_id, startup.secret_key)
            return None
        route = routing.route(startup.params.get("options"), startup.database, routing.server_name(writer, origin),
                              self.domain)
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
        await self.login.authenticate(startup, row, source, reader, writer,
                                      cleartext=origin is not None and origin.cleartext_ok)
        return startup, route, row

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
                await sessions.wake(self.fleet, row.uuid)
                if self.mode == "transaction":
                    await self.pooled.serve(startup, route, row, reader, writer)
                else:
                    await self.direct.serve(startup, route, row, reader, writer)
        finally:
            left = self.stats.per_database.get(row.uuid, 1) - 1
            if left:
                self.stats.per_database[row.uuid] = left
            else:
                self.stats.per_database.pop(row.uuid, None)

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
