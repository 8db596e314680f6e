"""The HTTP listener (`pgfleet up --listen-http`): POST /sql (Neon's SQL over HTTP) and
WebSocket upgrades (Postgres over WebSocket) on one port, with the proxy's TLS and routing.

The common request is parsed and answered by pgfleet.edge.http; WebSocket upgrades and every
other request go to aiohttp's low-level server (its C HTTP parser; no routing tables or
middlewares). Hostile clients before authentication hold at most `max_connections`
connections, each for at most `idle_timeout_s` without a whole request, with a body or
WebSocket message of at most `max_request_bytes`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from typing import Any

from aiohttp import web
from aiohttp.web_exceptions import HTTPRequestEntityTooLarge

from pgfleet.fleet.manager import Fleet
from pgfleet.proxy.errors import ClientError
from pgfleet.proxy.pool import AnswerTooLarge
from pgfleet.proxy.routing import route
from pgfleet.proxy.server import ProxyServer

from . import connstr
from . import sql as q
from .http import Answer, BodyTooLarge, HttpConnection, Request
from .passwords import KnownLogins, Login, PasswordChecker
from .settings import EdgeSettings
from .websocket import WebSocketBridge

log = logging.getLogger(__name__)

CORS = {"Access-Control-Allow-Origin": "*"}
PREFLIGHT = {
    **CORS,
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Neon-Connection-String, Neon-Raw-Text-Output, "
    "Neon-Array-Mode, Neon-Pool-Opt-In, Neon-Batch-Read-Only, Neon-Batch-Isolation-Level, Neon-Batch-Deferrable",
    "Access-Control-Max-Age": "86400",
}
_TRUE = "true"


class HttpError(Exception):
    """Answered as {message, code?} with this status (400 for what the driver should read)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class EdgeServer:
    def __init__(self, fleet: Fleet, direct: ProxyServer, pooled: ProxyServer, host: str, port: int, *,
                 tls: ssl.SSLContext | None = None, domain: str = "db.localhost",
                 settings: EdgeSettings = EdgeSettings()) -> None:
        self.fleet = fleet
        self.pooled = pooled
        self.host, self.port = host, port
        self.tls = tls
        self.domain = domain.lower().strip(".")
        self.settings = settings
        self.passwords = PasswordChecker(settings.password_cache)
        self.known = KnownLogins(settings.password_cache)
        self.statements = q.Statements()
        self.ws = WebSocketBridge(direct, pooled, self.domain, settings)
        self.in_flight: dict[str, int] = {}  # per database uuid: HTTP queries running or waiting
        self.refused_connections = 0
        self._web: web.Server | None = None
        self._fast: set[HttpConnection] = set()  # connections pgfleet.edge.http serves (not handed over)
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()

        def make_request(message, payload, protocol, writer, task) -> web.BaseRequest:
            return web.BaseRequest(message, payload, protocol, writer, task, loop,
                                   client_max_size=s.max_request_bytes)

        self._web = web.Server(self._handle, request_factory=make_request, keepalive_timeout=s.idle_timeout_s,
                               max_field_size=8190, max_headers=64, access_log=None, handler_cancellation=True)
        self._server = await loop.create_server(self._protocol, self.host, self.port, ssl=self.tls,
                                                ssl_handshake_timeout=s.idle_timeout_s if self.tls else None,
                                                reuse_address=True, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    def _protocol(self) -> asyncio.Protocol:
        assert self._web is not None
        if len(self._fast) + len(self._web.connections) >= self.settings.max_connections:
            self.refused_connections += 1
            return _Refuse()
        return HttpConnection(self._respond, self._web, self._fast, self.settings.max_request_bytes,
                              self.settings.idle_timeout_s)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._fast):
            if conn.transport is not None:
                conn.transport.close()
        await self.ws.close()
        if self._web is not None:
            await self._web.shutdown(1.0)

    # --- dispatch ------------------------------------------------------------------------
    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """A request aiohttp parsed (see pgfleet.edge.http for which)."""
        if request.headers.get("upgrade", "").lower() == "websocket":
            return await self.ws.handle(request)
        answer = await self._respond(request)
        if answer.status == 204:
            return web.Response(status=204, headers=answer.headers)
        return web.Response(status=answer.status, body=answer.body, content_type="application/json",
                            headers=answer.headers)

    async def _respond(self, request: Request | web.BaseRequest) -> Answer:
        if request.path.rstrip("/") != "/sql":
            return _error(HttpError(404, f"no such endpoint: {request.path[:200]} (POST /sql, or a WebSocket)"))
        if request.method == "OPTIONS":
            return Answer(204, b"", PREFLIGHT)
        if request.method != "POST":
            return _error(HttpError(405, "use POST /sql"))
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                return Answer(200, await self._sql(request), CORS)
        except HttpError as exc:
            return _error(exc)
        except q.QueryFailed as exc:
            return Answer(400, _dumps(exc.json()), CORS)
        except (HTTPRequestEntityTooLarge, BodyTooLarge):
            return _error(HttpError(413, f"the request body is larger than the limit of "
                                         f"{self.settings.max_request_bytes} bytes"))
        except TimeoutError:
            return _error(HttpError(504, f"the request took longer than {self.settings.request_timeout_s:g} s"))

    # --- POST /sql -----------------------------------------------------------------------
    async def _sql(self, request: Request | web.BaseRequest) -> bytes:
        headers = request.headers  # looked up by lower-case names (aiohttp's are case-insensitive)
        text = headers.get("neon-connection-string")
        if not text:
            raise HttpError(400, "missing the Neon-Connection-String header")
        sni = _sni(request)
        source = request.remote or "unknown"
        key = self.known.key(text, sni)
        login = self.known.get(key)
        row = self._row(login.database, sni) if login is not None else None
        if login is not None and row.role == login.user and row.verifier == login.verifier:
            self._throttle(row, login.user, source)
            self.pooled.guards.logins.succeeded(login.user, source)
        else:
            try:
                target = connstr.parse(text)
            except connstr.BadConnectionString as exc:
                raise HttpError(400, str(exc), "08P01")
            row = self._find(sni, target)
            await self._authenticate(row, target, source)
            self.known.add(key, Login(target.user, row.name, row.verifier))
        raw_text = headers.get("neon-raw-text-output", "").lower() == _TRUE
        array_mode = headers.get("neon-array-mode", "").lower() == _TRUE
        batch_opts = _batch_options(headers)
        try:
            queries, is_batch = q.parse_body(await request.read(), self.settings.max_batch)
        except q.BadRequest as exc:
            raise HttpError(400, str(exc), "08P01")
        batch = batch_opts if is_batch else None
        names = [self.statements.name(x) for x in queries]
        dirty = any(q.changes_session(x.sql) for x in queries)
        answers = await self._run(row, queries, batch, names, dirty)
        if answers.error is not None and any(names) and q.stale_statement(answers.error):
            answers = await self._run(row, queries, batch, None, dirty)
        if answers.error is not None:
            raise q.QueryFailed(answers.error)
        results = [q.result_json(r, x.array_mode if x.array_mode is not None else array_mode, raw_text)
                   for r, x in zip(answers.results, queries)]
        return _dumps({"results": results} if is_batch else results[0])

    async def _authenticate(self, row, target: connstr.ConnectionString, source: str) -> None:
        """The password before the body (a stranger's body is never read: it waits in the
        socket), under the proxy listeners' login backoff per role and source address."""
        logins = self.pooled.guards.logins
        self._throttle(row, target.user, source)
        if target.password is None or target.user != row.role or not await self.passwords.check(
                row.verifier, target.password):
            failures = logins.failed(target.user, source)
            self.pooled.login.note_failure(row, target.user, "http", source, failures=failures)
            raise HttpError(400, f'password authentication failed for user "{target.user}"', "28P01")
        logins.succeeded(target.user, source)

    def _throttle(self, row, user: str, source: str) -> None:
        """The proxy listeners' login backoff per role and source address."""
        try:
            self.pooled.guards.logins.check(user, source)
        except ClientError as exc:
            self.fleet.events.emit("connection_refused", row.name, reason="login backoff", user=user[:64],
                                   listener="http", peer=source)
            raise HttpError(429, str(exc), exc.sqlstate)

    def _find(self, sni: str | None, target: connstr.ConnectionString):
        """The proxy's routing: the TLS server name, else the connection string's host, as
        `<database>.<domain>`; then `options=endpoint=<database>`; then the database name."""
        chosen = route(target.options, target.database, sni, self.domain)
        if chosen.how != "sni":
            by_host = route(target.options, target.database, target.host, self.domain)
            if by_host.how == "sni":
                chosen = by_host
        return self._row(chosen.name, sni)

    def _row(self, name: str, sni: str | None):
        row = self.fleet.find(name)
        if row is None:
            raise HttpError(400, f'database "{name}" does not exist', "3D000")
        if row.deleting:
            raise HttpError(400, f'database "{name}" is being deleted', "57P03")
        if row.require_tls and sni is None:
            raise HttpError(400, f'database "{name}" requires an encrypted connection (https)', "28000")
        return row

    async def _run(self, row, queries: list[q.Query], batch: q.Batch | None, names: list[str | None] | None,
                   dirty: bool) -> q.Answers:
        """One round trip on a pooled server connection (the pool wakes the database).
        `names`: the queries' statement names (None: all unnamed)."""
        uuid = row.uuid
        current = self.in_flight.get(uuid, 0)
        if current >= row.max_pooled_clients:
            self.fleet.events.emit("connection_refused", row.name, listener="http", limit=row.max_pooled_clients)
            raise HttpError(400, f'too many pooled connections for database "{row.name}" '
                                 f"(limit {row.max_pooled_clients})", "53300")
        self.in_flight[uuid] = current + 1
        pool = self.pooled.pool_for(row)
        conn = None
        try:
            async with self.fleet.lease(uuid, fresh=False):
                try:
                    conn = await pool.acquire()
                except HttpError:
                    raise
                except Exception as exc:  # the proxy's wake errors carry a SQLSTATE
                    raise HttpError(400, f"could not reach the database: {exc}", getattr(exc, "sqlstate", "08006"))
                prepared = conn.prepared
                sent = q.messages(queries, batch, names, prepared, q.MAX_PREPARED_PER_CONNECTION - len(prepared))
                payload, readies = sent.data, sent.readies
                if conn.pset is not pool.registry.base:  # a pooled client's parameters: back to the defaults
                    sync, extra = pool.registry.base.sync_from(conn.pset)
                    conn.pset = pool.registry.base
                    payload, readies = sync + payload, readies + extra
                self.fleet.session_busy(uuid, True)
                try:
                    msgs = await conn.exchange(payload, readies, self.settings.max_response_bytes)
                finally:
                    self.fleet.session_busy(uuid, False)
            answers = q.read_answers(msgs)
            for name in sent.parsed[:answers.parse_completes]:
                if name is not None:
                    prepared.add(name)
            stale = answers.error is not None and q.stale_statement(answers.error)
            if answers.clean and not dirty and not stale:
                pool.release(conn)
            else:
                pool.discard(conn)
            conn = None
            return answers
        except AnswerTooLarge:
            raise HttpError(507, f"the response is larger than the limit of {self.settings.max_response_bytes} bytes")
        except (ConnectionError, OSError) as exc:
            raise HttpError(400, f"the database connection was lost: {exc}", "08006")
        finally:
            if conn is not None:  # an exchange that did not finish: its state is unknown
                pool.discard(conn)
            left = self.in_flight.get(uuid, 1) - 1
            if left:
                self.in_flight[uuid] = left
            else:
                self.in_flight.pop(uuid, None)


def _batch_options(headers) -> q.Batch:
    level = headers.get("neon-batch-isolation-level")
    isolation = None
    if level:
        isolation = q.ISOLATION.get(level.replace(" ", "").replace("_", "").lower())
        if isolation is None:
            raise HttpError(400, f"unknown Neon-Batch-Isolation-Level {level[:100]!r}: Serializable, "
                                 "RepeatableRead, ReadCommitted or ReadUncommitted")
    return q.Batch(isolation, headers.get("neon-batch-read-only", "").lower() == _TRUE,
                   headers.get("neon-batch-deferrable", "").lower() == _TRUE)


def _sni(request: Request | web.BaseRequest) -> str | None:
    transport = request.transport
    ssl_obj = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_obj is None:
        return None
    return getattr(ssl_obj, "pgfleet_sni", None) or ""


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _error(exc: HttpError) -> Answer:
    doc: dict[str, Any] = {"message": str(exc)}
    if exc.code:
        doc["code"] = exc.code
    return Answer(exc.status, _dumps(doc), CORS)


class _Refuse(asyncio.Protocol):
    """Over the connection limit: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()
