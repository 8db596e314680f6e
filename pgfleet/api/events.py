"""Events over the API: the recent ones, one database's history, and a live stream (SSE).

GET /v1/events                 the newest events (?database=NAME&limit=N)
GET /v1/events?follow=true     Server-Sent Events: the recent ones, then each as it happens
GET /v1/databases/{ref}/history  its stored transitions with its recent events (wakes and
                               their latency, failed logins, refusals), newest first
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from pgfleet.fleet.events import Event, TooManySubscribers

from .common import ApiContext, ApiError, envelope, iso

router = APIRouter(tags=["events"])

KEEPALIVE_S = 15.0
#: event kinds that only the ring has (the store keeps every transition)
RING_ONLY = {"wake", "auth_failure", "connection_refused", "quota_refused", "created", "create_failed"}


def _ctx(request: Request) -> ApiContext:
    return request.app.state.ctx


#: a list (JSON) or, with follow=true, a live stream (server-sent events): both documented
_EVENTS_200 = {200: {"description": "Recent events, or with `follow=true` a server-sent event stream",
                     "content": {"application/json": {}, "text/event-stream": {}}}}


@router.get("/v1/events", responses=_EVENTS_200)
async def events(request: Request, database: str | None = Query(None, max_length=64),
                 limit: int = Query(100, ge=0, le=2000), follow: bool = False):
    ctx = _ctx(request)
    if not follow:
        started = time.perf_counter()
        recent = ctx.fleet.events.recent(database, limit)
        return envelope({"events": [e.to_json() for e in recent]}, started)
    try:
        sub = ctx.fleet.events.subscribe(database)
    except TooManySubscribers as exc:
        raise ApiError(429, str(exc), "too_many_followers") from None
    backlog = ctx.fleet.events.recent(database, limit)
    return StreamingResponse(_stream(ctx, sub, backlog), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def sse(event: Event) -> bytes:
    return f"id: {event.seq}\nevent: {event.kind}\ndata: {json.dumps(event.to_json())}\n\n".encode()


async def _stream(ctx: ApiContext, sub, backlog: list[Event]):
    try:
        yield b"retry: 2000\n\n"
        last = 0
        for event in backlog:
            last = event.seq
            yield sse(event)
        while not sub.lost:
            event = await sub.next(KEEPALIVE_S)
            if event is None:
                if sub.lost:
                    break
                yield b": keep-alive\n\n"
            elif event.seq > last:
                yield sse(event)
        yield b"event: lost\ndata: {\"message\": \"too slow a reader: reconnect\"}\n\n"
    except asyncio.CancelledError:
        raise
    finally:
        ctx.fleet.events.unsubscribe(sub)


@router.get("/v1/databases/{ref}/history", tags=["databases"])
async def history(ref: str, request: Request, limit: int = Query(100, ge=1, le=2000)):
    started = time.perf_counter()
    ctx = _ctx(request)
    row = ctx.fleet.get(ref)
    out = [
        {"at": iso(e["at"]), "kind": "transition", "from": e["from_state"], "to": e["to_state"],
         "reason": e["reason"], "_t": e["at"]}
        for e in ctx.fleet.history(row.uuid, limit)
    ]
    for e in ctx.fleet.events.recent(row.name, limit, kinds=RING_ONLY):
        if e.at < row.created_at:  # a deleted database of the same name
            continue
        out.append({**{k: v for k, v in e.to_json().items() if k not in ("seq", "database")}, "_t": e.at})
    out.sort(key=lambda e: e["_t"], reverse=True)
    for e in out:
        del e["_t"]
    return envelope({"name": row.name, "events": out[:limit]}, started)
