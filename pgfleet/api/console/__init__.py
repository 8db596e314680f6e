"""The web console: one static page and its script, served by the daemon (no build step).

The page and script hold no data and are public; everything they show comes from the API
with the token (typed into the page, or handed over in the URL fragment by `pgfleet
console`, which never reaches the server or its logs) in an Authorization header, so no
cookie exists for another site to ride on. Names and every other value are put into the
page as text (textContent), never as HTML; a Content-Security-Policy allows only this
script.
"""

from __future__ import annotations

import time
from importlib import resources

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from ..common import ApiContext, envelope
from ..databases import database_json
from ..metrics import tier_of

router = APIRouter(tags=["console"])

PUBLIC_PATHS = {"/console", "/console/app.js"}
_CSP = ("default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
_HEADERS = {"Content-Security-Policy": _CSP, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text()


@router.get("/console", include_in_schema=False)
async def page():
    return HTMLResponse(_asset("page.html"), headers=_HEADERS)


@router.get("/console/app.js", include_in_schema=False)
async def script():
    return Response(_asset("app.js"), media_type="text/javascript", headers=_HEADERS)


@router.get("/v1/console/databases")
async def overview(request: Request, events: int = Query(50, ge=0, le=500)):
    """What the console shows: every database with its tier and recent wakes, and recent events."""
    started = time.perf_counter()
    ctx: ApiContext = request.app.state.ctx
    tele = ctx.fleet.telemetry.by_uuid
    rows = []
    for row in ctx.fleet.list():
        d = database_json(ctx, row)
        t = tele.get(row.uuid)
        rows.append({
            "name": d["name"], "state": d["state"], "tier": tier_of(row) or None, "memory_mb": d["memory_mb"],
            "clients": d["clients"], "uri": d["uri"], "scale_to_zero": d["scale_to_zero"],
            "wakes": [[round(at, 3), round(s * 1000, 1)] for at, s in t.recent_wakes] if t else [],
        })
    recent = [e.to_json() for e in ctx.fleet.events.recent(limit=events)] if events else []
    return envelope({"databases": rows, "events": recent[::-1]}, started)
