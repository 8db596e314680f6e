"""The REST API application: routes, auth, and mapping every failure to a clear 4xx/5xx."""

from __future__ import annotations

import logging
from pathlib import Path

import pydantic

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pgfleet import __version__, hostlimits
from pgfleet.drivers.base import DriverError
from pgfleet.fleet.errors import FleetError

from fastapi.responses import HTMLResponse

from . import branches, console, databases, events, metrics, ukc, ukc_resources
from .common import MAX_BODY_BYTES, ApiContext, ApiError, check_token, envelope, error_body
from .docs_page import DOCS_HTML
from .ukc_common import ERROR_RESPONSES

log = logging.getLogger(__name__)

# the schema and the docs page describe the API and hold no data; everything else needs the token
# (the console's page and script too: they hold no data and ask for the token)
PUBLIC_PATHS = {"/healthz", "/openapi.json", "/docs", *console.PUBLIC_PATHS}


class BodyLimit:
    """Request bodies are at most `limit` bytes, counted while they are read: a declared
    Content-Length over it is refused before reading, and a chunked body (no length) is
    refused as soon as it passes it. The body (bounded) is handed on to the app whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = error_body(413, f"request body larger than {self.limit} bytes", "too_large")
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await too_large(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def warm_routes(app: FastAPI, token: str) -> None:
    """Build every route's request handling before the API serves. FastAPI (0.16x) builds
    a router's routes at the first request that reaches it: ~70 ms of the daemon's event
    loop, during which every proxied client waits (the first branch after a start stalled
    its parent's clients that long). One request for a path no route has walks them all."""
    path = "/v1/-warm-routes-"
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"localhost"), (b"authorization", f"Bearer {token}".encode())],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "state": {}}

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(_message: Message) -> None:
        pass

    await app(scope, receive, send)


def create_app(ctx: ApiContext) -> FastAPI:
    app = FastAPI(
        title="pgfleet", version=__version__, docs_url=None, redoc_url=None,
        description="Serverless Postgres on your own hosts: the native /v1/databases API and a "
                    "Unikraft Cloud-compatible /v1/instances, /v1/services, /v1/volumes, /v1/users/quotas.",
    )
    app.state.ctx = ctx

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path not in PUBLIC_PATHS:
            try:
                check_token(request, ctx.token)
            except ApiError as exc:
                return error_body(exc.status, str(exc), exc.code)
        return await call_next(request)

    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)  # outermost: before anything reads the body

    @app.exception_handler(FleetError)
    async def fleet_error(_request: Request, exc: FleetError):
        return error_body(exc.http, str(exc), exc.code)

    @app.exception_handler(DriverError)
    async def driver_error(_request: Request, exc: DriverError):
        return error_body(503, str(exc), "driver")

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError):
        return error_body(exc.status, str(exc), exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()
        )
        return error_body(400, f"invalid request: {problems}", "invalid")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        return error_body(exc.status_code, str(exc.detail), "http")

    @app.exception_handler(pydantic.ValidationError)
    async def invalid_item(_request: Request, exc: pydantic.ValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'item'}: {e['msg']}" for e in exc.errors())
        return error_body(400, f"invalid request: {problems}", "invalid")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return error_body(500, f"internal error: {type(exc).__name__}", "internal")

    @app.get("/healthz", tags=["meta"])
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/status", tags=["meta"])
    async def status():
        by_state = ctx.fleet.count_by_state()
        quotas, _ = ctx.fleet.quota_usage()
        limits = hostlimits.checks(Path(ctx.home), quotas.instances, quotas.live_instances)
        stats = ctx.proxy_stats
        return envelope({
            "version": __version__, "driver": ctx.driver, "home": ctx.home,
            "listen": f"{ctx.public_host}:{ctx.port}", "listen_pooled": f"{ctx.public_host}:{ctx.pooled_port}",
            "tls_ca_file": ctx.ca_file, "domain": ctx.domain,
            "databases": sum(by_state.values()), "states": by_state,
            "host_limits": [c.to_json() for c in limits],
            "standby": ctx.fleet.standby_status(),
            "memory": ctx.fleet.memory.status() if ctx.fleet.memory is not None else None,
            "proxy": stats() if stats else None,
            "branch_storage": ctx.branch_storage,
        })

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return HTMLResponse(DOCS_HTML)  # self-contained: no CDN, works offline

    app.include_router(databases.router, responses=ERROR_RESPONSES)
    app.include_router(events.router, responses=ERROR_RESPONSES)
    app.include_router(metrics.router)
    app.include_router(branches.router, responses=ERROR_RESPONSES)
    app.include_router(console.router, responses=ERROR_RESPONSES)
    app.include_router(ukc.router)
    app.include_router(ukc_resources.services)
    app.include_router(ukc_resources.volumes)
    app.include_router(ukc_resources.users)
    return app
