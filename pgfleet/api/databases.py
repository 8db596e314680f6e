"""pgfleet's own resource: /v1/databases."""

from __future__ import annotations

import time
from typing import Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from pgfleet import settings as S
from pgfleet.fleet.states import State
from pgfleet.store import InstanceRow
from pgfleet.uri import connection_uris

from .common import MAX_STRING, ApiContext, envelope, iso

router = APIRouter(prefix="/v1/databases", tags=["databases"])


class ScaleToZero(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=MAX_STRING)
    policy: Literal["on", "off", "idle"] = S.DEFAULT_POLICY
    cooldown_ms: int = Field(S.COOLDOWN_MS.default, ge=S.COOLDOWN_MS.min, le=S.COOLDOWN_MS.max)
    #: warm standby this long, then cold
    cold_after_ms: int = Field(S.COLD_AFTER_MS.default, ge=S.COLD_AFTER_MS.min, le=S.COLD_AFTER_MS.max)


class Pooling(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=MAX_STRING)
    pool_size: int = Field(S.POOL_SIZE.default, ge=S.POOL_SIZE.min, le=S.POOL_SIZE.max)
    max_pooled_clients: int = Field(S.MAX_POOLED_CLIENTS.default, ge=S.MAX_POOLED_CLIENTS.min,
                                    le=S.MAX_POOLED_CLIENTS.max)
    max_direct_clients: int = Field(S.MAX_DIRECT_CLIENTS.default, ge=S.MAX_DIRECT_CLIENTS.min,
                                    le=S.MAX_DIRECT_CLIENTS.max)


class CreateDatabase(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=MAX_STRING)
    name: str = Field(max_length=1024)  # the fleet explains what a valid name is
    image: str = Field("postgres:15", max_length=512)
    memory_mb: int = Field(S.MEMORY_MB.default, ge=S.MEMORY_MB.min, le=S.MEMORY_MB.max)
    scale_to_zero: ScaleToZero = ScaleToZero()
    autostart: bool = True
    require_tls: bool = False
    pooling: Pooling = Pooling()
    disk_mb: int = Field(S.DISK_MB.default, ge=S.DISK_MB.lowest, le=S.DISK_MB.max, description="disk limit in MiB; 0: none of its own")
    cpu_pct: int = Field(S.CPU_PCT.default, ge=S.CPU_PCT.lowest, le=S.CPU_PCT.max, description="CPU cap, percent of one CPU; 0: none")


class PatchDatabase(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=MAX_STRING)
    memory_mb: int | None = Field(None, ge=S.MEMORY_MB.min, le=S.MEMORY_MB.max)
    disk_mb: int | None = Field(None, ge=S.DISK_MB.lowest, le=S.DISK_MB.max, description="can only grow")
    cpu_pct: int | None = Field(None, ge=S.CPU_PCT.lowest, le=S.CPU_PCT.max, description="applies at the next start")
    scale_to_zero: ScaleToZero | None = None


class SuspendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=MAX_STRING)
    drain_timeout_ms: int = Field(S.DRAIN_TIMEOUT_MS.default, ge=S.DRAIN_TIMEOUT_MS.min, le=S.DRAIN_TIMEOUT_MS.max)
    #: cold: stopped (sessions end); warm: frozen, sessions kept (refused while one is busy)
    tier: Literal["warm", "cold"] = "cold"


def uris(ctx: ApiContext, row: InstanceRow, password: str | None = None) -> dict[str, str]:
    return connection_uris(row.role, password, f"{ctx.public_host}:{ctx.port}",
                           f"{ctx.public_host}:{ctx.pooled_port}", row.name)


def database_json(ctx: ApiContext, row: InstanceRow, password: str | None = None) -> dict:
    sessions = ctx.fleet.sessions(row.uuid)
    backend = ctx.fleet.backend_of(row.uuid) if row.state == State.RUNNING else None
    out = {
        "uuid": row.uuid,
        "name": row.name,
        "state": "deleting" if row.deleting else row.state,
        "driver": row.driver,
        "image": row.image,
        "memory_mb": row.memory_mb,
        "disk_mb": row.disk_mb,
        "cpu_pct": row.cpu_pct,
        "scale_to_zero": {"policy": row.stz_policy, "cooldown_ms": row.cooldown_ms,
                          "cold_after_ms": row.cold_after_ms},
        "standby_tier": (row.standby_tier or "cold") if row.state == State.STANDBY else None,
        "role": row.role,
        "created_at": iso(row.created_at),
        "started_at": iso(row.started_at),
        "stopped_at": iso(row.stopped_at),
        "start_count": row.start_count,
        "stop_reason": row.stop_reason,
        "boot_time_us": row.boot_time_us,
        "clients": sessions.open,
        "require_tls": bool(row.require_tls),
        "pooling": {"pool_size": row.pool_size, "max_pooled_clients": row.max_pooled_clients,
                    "max_direct_clients": row.max_direct_clients},
        **uris(ctx, row, password),
    }
    charged, swapped = ctx.fleet.memory_charged(row)
    out["memory_charged_bytes"], out["memory_swapped_bytes"] = charged, swapped
    if backend is not None:
        out["backend"] = backend.describe()
        out["backend_user"] = backend.admin_user
    if password is not None:
        out["password"] = password
    return out


def _ctx(request: Request) -> ApiContext:
    return request.app.state.ctx


@router.post("", status_code=201)
async def create_database(body: CreateDatabase, request: Request):
    started = time.perf_counter()
    ctx = _ctx(request)
    created = await ctx.fleet.create(
        body.name, memory_mb=body.memory_mb, cooldown_ms=body.scale_to_zero.cooldown_ms,
        policy=body.scale_to_zero.policy, image=body.image, autostart=body.autostart,
        require_tls=body.require_tls, pool_size=body.pooling.pool_size,
        max_pooled_clients=body.pooling.max_pooled_clients, max_direct_clients=body.pooling.max_direct_clients,
        cold_after_ms=body.scale_to_zero.cold_after_ms,
        disk_mb=body.disk_mb, cpu_pct=body.cpu_pct,
    )
    return envelope(database_json(ctx, created.row, created.password), started, status=201)


ListState = Literal["starting", "running", "draining", "stopping", "standby", "stopped", "deleting"]
MAX_PAGE = 10_000


@router.get("")
async def list_databases(
    request: Request,
    limit: int | None = Query(None, ge=1, le=MAX_PAGE, description="at most this many (by name); all if absent"),
    cursor: str | None = Query(None, max_length=1024, description="the next_cursor of the previous page"),
    state: ListState | None = Query(None, description="only databases in this state"),
):
    """Databases by name. With `limit`, `next_cursor` is set while more remain: pass it as
    `cursor` for the next page."""
    started = time.perf_counter()
    ctx = _ctx(request)
    rows = ctx.fleet.page(limit=limit + 1 if limit else None, after=cursor, state=state)
    more = limit is not None and len(rows) > limit
    rows = rows[:limit] if more else rows
    return envelope({"databases": [database_json(ctx, r) for r in rows],
                     "next_cursor": rows[-1].name if more else None}, started)


@router.get("/{ref}")
async def get_database(ref: str, request: Request):
    started = time.perf_counter()
    ctx = _ctx(request)
    row = ctx.fleet.get(ref)
    # only here, not in the list: measuring walks the database's own files
    return envelope({**database_json(ctx, row), "disk_bytes": await ctx.fleet.disk_bytes(row)}, started)


@router.patch("/{ref}")
async def patch_database(ref: str, body: PatchDatabase, request: Request):
    started = time.perf_counter()
    ctx = _ctx(request)
    stz = body.scale_to_zero
    row = await ctx.fleet.update(
        ref, memory_mb=body.memory_mb, disk_mb=body.disk_mb, cpu_pct=body.cpu_pct,
        cooldown_ms=stz.cooldown_ms if stz else None, policy=stz.policy if stz else None,
        cold_after_ms=stz.cold_after_ms if stz else None,
    )
    return envelope(database_json(ctx, row), started)


@router.delete("/{ref}")
async def delete_database(ref: str, request: Request):
    started = time.perf_counter()
    ctx = _ctx(request)
    row = await ctx.fleet.delete(ref)
    return envelope({"uuid": row.uuid, "name": row.name, "state": "deleted"}, started)


def _drain_s(body: SuspendRequest | None) -> float:
    return (body or SuspendRequest()).drain_timeout_ms / 1000


@router.put("/{ref}/suspend")
async def suspend_database(ref: str, request: Request, body: SuspendRequest | None = None):
    started = time.perf_counter()
    ctx = _ctx(request)
    row = await ctx.fleet.suspend(ref, reason="suspended by user", drain_timeout_s=_drain_s(body),
                                  tier=body.tier if body else "cold")
    return envelope(database_json(ctx, row), started)


@router.put("/{ref}/resume")
async def resume_database(ref: str, request: Request):
    started = time.perf_counter()
    ctx = _ctx(request)
    row = await ctx.fleet.resume(ref)
    return envelope(database_json(ctx, row), started)


@router.put("/{ref}/stop")
async def stop_database(ref: str, request: Request, body: SuspendRequest | None = None):
    started = time.perf_counter()
    ctx = _ctx(request)
    row = await ctx.fleet.stop(ref, drain_timeout_s=_drain_s(body))
    return envelope(database_json(ctx, row), started)


@router.post("/{ref}/password")
async def rotate_password(ref: str, request: Request):
    started = time.perf_counter()
    ctx = _ctx(request)
    row, password = await ctx.fleet.rotate_password(ref)
    return envelope(database_json(ctx, row, password), started)


@router.get("/{ref}/logs")
async def database_logs(ref: str, request: Request, tail_bytes: int = Query(65536, ge=0, le=16 << 20)):
    """The end of the database's server (sandbox) or console (microvm) log, as text."""
    started = time.perf_counter()
    ctx = _ctx(request)
    row = ctx.fleet.get(ref)
    path = ctx.fleet.log_path(row)
    text, size = "", 0
    if path is not None and path.exists():
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - tail_bytes))
            text = f.read().decode("utf-8", "replace")
    return envelope({"name": row.name, "path": str(path) if path else None, "size": size, "log": text}, started)
