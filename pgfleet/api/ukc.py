"""A Unikraft Cloud-compatible control API (the subset that makes sense for Postgres).

Every pgfleet database is a UKC "instance" of the image `postgres:<tag>`; its listener
on the pgfleet proxy is its "service group", and its data directory is its "volume".
The official `unikraft-cloud` SDK works against it with `UKC_METRO=http://host:port`.
Deviations from the platform are listed in docs/api.md.
"""


import asyncio
import base64
import re
import secrets
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query, Request
from pydantic import Field

from pgfleet.fleet.errors import AlreadyExists, InvalidRequest, NotFound, QuotaExceeded
from pgfleet import settings as S
from pgfleet.fleet.states import State
from pgfleet.store import InstanceRow

from .common import ApiContext, BoundedJSON, iso
from .databases import uris
from .ukc_common import (
    ERROR_RESPONSES,
    ItemError,
    NameOrUUID,
    Outcome,
    Strict,
    as_items,
    ctx_of,
    derived_uuid,
    query_refs,
    resolve,
)

router = APIRouter(prefix="/v1/instances", tags=["ukc: instances"], responses=ERROR_RESPONSES)

KEY = "instances"
DATA_MOUNT = "/var/lib/postgresql/data"
UKC_DEFAULT_COOLDOWN_MS = 1000  # the platform's default when scale_to_zero names none
MAX_WAIT_S = 600
MAX_LOG_BYTES = 1 << 20
_IMAGE = re.compile(r"^(?:[a-z0-9.-]+(?::[0-9]+)?/)*(?:library/)?postgres(?::[A-Za-z0-9._-]{1,128})?(?:@sha256:[0-9a-f]{64})?$")

# UKC's stop_reason is a bitmask: 1 kernel, 2 application, 4 platform, 8 user, 16 forced
_STOP_REASONS = {
    "stop": 15, "suspended by user": 15, "suspend": 15,  # the user asked; clean shutdown
    "idle": 7, "daemon shutdown": 7,  # the platform scaled it to zero, cleanly
    "crashed": 1, "start failed": 1,
}


# --- request bodies -----------------------------------------------------------------
class ImageSpec(Strict):
    url: str = Field(max_length=512)
    credentials: str | None = Field(None, max_length=4096)
    headers: dict[str, str] | None = None
    pull_policy: Literal["always", "if_not_present", "never"] | None = None


class ScaleToZeroIn(Strict):
    policy: Literal["on", "off", "idle"] = "on"
    stateful: bool = False
    cooldown_time_ms: int = Field(UKC_DEFAULT_COOLDOWN_MS, ge=S.COOLDOWN_MS.min, le=S.COOLDOWN_MS.max)
    notify_time_ms: int | None = Field(None, ge=0, le=3_600_000)


class ServiceIn(Strict):
    port: int = Field(ge=1, le=65535)
    destination_port: int | None = Field(None, ge=1, le=65535)
    protocol: Literal["tcp", "udp"] | None = None
    handlers: list[Literal["tls", "http", "redirect"]] | None = Field(None, max_length=3)


class ServiceGroupIn(Strict):
    uuid: str | None = Field(None, max_length=64)
    name: str | None = Field(None, max_length=253)
    services: list[ServiceIn] | None = Field(None, max_length=16)
    domains: list[dict[str, BoundedJSON]] | None = Field(None, max_length=16)
    soft_limit: int | None = Field(None, ge=1, le=65535)
    hard_limit: int | None = Field(None, ge=1, le=65535)


class CreateInstance(Strict):
    name: str | None = Field(None, min_length=1, max_length=63, pattern=r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
    image: Annotated[str, Field(max_length=512, pattern=r"^([a-z0-9.:-]+/)*postgres(:[A-Za-z0-9._-]+)?(@sha256:[0-9a-f]{64})?$")] | ImageSpec
    args: list[str] | None = Field(None, max_length=64)
    env: dict[str, str] | None = Field(None, max_length=64)
    memory_mb: int = Field(S.MEMORY_MB.default, ge=S.MEMORY_MB.min, le=S.MEMORY_MB.max)
    vcpus: int | None = Field(None, ge=1, le=64)
    service_group: ServiceGroupIn | None = None
    volumes: list[dict[str, BoundedJSON]] | None = Field(None, max_length=16)
    autostart: bool = True
    replicas: int = Field(0, ge=0, le=100)
    restart_policy: Literal["never", "always", "on-failure"] | None = None
    scale_to_zero: ScaleToZeroIn | None = None
    timeout_s: int | None = Field(None, ge=-1, le=MAX_WAIT_S)
    wait_timeout_ms: int | None = Field(None, ge=-1, le=MAX_WAIT_S * 1000)
    features: list[str] | None = Field(None, max_length=16)
    tags: list[str] | None = Field(None, max_length=64)


class RefItem(NameOrUUID):
    pass


class StartItem(NameOrUUID):
    timeout_s: int | None = Field(None, ge=-1, le=MAX_WAIT_S)
    wait_timeout_ms: int | None = Field(None, ge=-1, le=MAX_WAIT_S * 1000)


class StopItem(NameOrUUID):
    force: bool = False
    drain_timeout_ms: int | None = Field(None, ge=-1, le=S.DRAIN_TIMEOUT_MS.max)
    quick: bool | None = None
    ifstate: str | None = Field(None, max_length=32)


class SuspendItem(NameOrUUID):
    drain_timeout_ms: int | None = Field(None, ge=-1, le=S.DRAIN_TIMEOUT_MS.max)


class DeleteItem(NameOrUUID):
    timeout_s: int | None = Field(None, ge=-1, le=MAX_WAIT_S)
    dont_retain: bool | None = None


class WaitItem(NameOrUUID):
    state: Literal[tuple(s.value for s in State)] = "running"  # type: ignore[valid-type]
    timeout_ms: int | None = Field(None, ge=-1, le=MAX_WAIT_S * 1000)
    timeout_s: int | None = Field(None, ge=-1, le=MAX_WAIT_S)


class LogItem(NameOrUUID):
    offset: int | None = Field(None, ge=-(1 << 40), le=1 << 40)
    limit: int | None = Field(None, ge=0, le=MAX_LOG_BYTES)


class PatchItem(NameOrUUID):
    id: str | None = Field(None, max_length=64)
    prop: Literal["memory_mb", "scale_to_zero", "tags", "env", "image", "args", "vcpus"]
    op: Literal["set", "add", "del"]
    value: BoundedJSON = None


# --- presenting an instance -----------------------------------------------------------
def _meta(row: InstanceRow) -> dict:
    meta = row.tags.get("ukc") if isinstance(row.tags, dict) else None
    return meta if isinstance(meta, dict) else {}


def instance_json(ctx: ApiContext, row: InstanceRow, details: bool = True) -> dict:
    if not details:
        return {"uuid": row.uuid, "name": row.name}
    meta = _meta(row)
    sessions = ctx.fleet.sessions(row.uuid)
    backend = ctx.fleet.backend_of(row.uuid) if row.state == State.RUNNING else None
    now = time.time()
    state = "stopping" if row.deleting else row.state
    out: dict[str, Any] = {
        "uuid": row.uuid,
        "name": row.name,
        "created_at": iso(row.created_at),
        "state": state,
        "image": row.image,
        "memory_mb": row.memory_mb,
        "vcpus": row.vcpus,
        "args": [],
        "env": meta.get("env", {}),
        "start_count": row.start_count,
        "started_at": iso(row.started_at),
        "stopped_at": iso(row.stopped_at) if row.state != State.RUNNING else None,
        "uptime_ms": int((now - row.started_at) * 1000) if row.state == State.RUNNING and row.started_at else 0,
        "boot_time_us": row.boot_time_us,
        "stop_reason": _STOP_REASONS.get(row.stop_reason or "", 0) if row.stop_reason else None,
        "restart_policy": "on-failure" if row.stz_policy == "off" else "never",
        "scale_to_zero": {
            "enabled": row.stz_policy != "off",
            "policy": row.stz_policy,
            "stateful": bool(meta.get("stateful", False)),
            "cooldown_time_ms": row.cooldown_ms,
        },
        "service_group": {
            "uuid": derived_uuid("service", row.uuid), "name": f"{row.name}-svc",
            "domains": [{"fqdn": f"{row.name}.{ctx.public_host}"}],
        },
        "volumes": [{"uuid": derived_uuid("volume", row.uuid), "name": f"{row.name}-data",
                     "at": DATA_MOUNT, "readonly": False}],
        "private_fqdn": f"{row.name}.internal",
        "tags": list(meta.get("tags", [])),
        "pgfleet": {
            "driver": row.driver, "role": row.role, "stop_reason": row.stop_reason,
            "clients": sessions.open, **uris(ctx, row),
        },
    }
    if backend is not None:
        out["pgfleet"]["backend"] = backend.describe()
        if backend.host is not None:
            out["private_ip"] = backend.host
    return out


async def detailed(ctx: ApiContext, row: InstanceRow, details: bool = True) -> dict:
    """The instance with the metrics that apply: memory in use, client sessions."""
    out = instance_json(ctx, row, details)
    if details:
        sessions = ctx.fleet.sessions(row.uuid)
        usage = await ctx.fleet.usage(row)
        out["rss_bytes"] = int(usage.get("rss_bytes", 0))
        if "cpu_time_ms" in usage:
            out["cpu_time_ms"] = int(usage["cpu_time_ms"])
        out["nconns"] = sessions.open
        out["ntotal"] = sessions.total
    return out


def brief(row: InstanceRow, previous: str | None = None) -> dict:
    out = {"uuid": row.uuid, "name": row.name, "state": "stopping" if row.deleting else row.state}
    if previous is not None:
        out["previous_state"] = previous
    return out


def _check_image(image: str | ImageSpec) -> str:
    url = image.url if isinstance(image, ImageSpec) else image
    if not _IMAGE.match(url):
        raise InvalidRequest(f"image {url!r} is not supported: pgfleet runs only postgres images (e.g. postgres:15)")
    return url


def _random_name() -> str:
    return "postgres-" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(5))


def _wait_seconds(timeout_s: int | None, timeout_ms: int | None, default: float) -> float:
    if timeout_s is not None:
        return MAX_WAIT_S if timeout_s < 0 else float(timeout_s)
    if timeout_ms is not None:
        return MAX_WAIT_S if timeout_ms < 0 else timeout_ms / 1000
    return default


def _drain_seconds(ms: int | None, force: bool = False) -> float:
    if force:
        return 0.0
    if ms is None:
        return S.DEFAULT_DRAIN_TIMEOUT_S
    return S.DRAIN_TIMEOUT_MS.max / 1000 if ms < 0 else ms / 1000


# --- create ---------------------------------------------------------------------------
@router.post("", summary="Create an instance (a Postgres database)")
async def create_instance(request: Request, body: CreateInstance):
    ctx = ctx_of(request)
    out = Outcome(KEY)
    ref = {"name": body.name}
    try:
        image = _check_image(body.image)
        if body.timeout_s is not None and body.timeout_s != 0 and not body.autostart:
            raise InvalidRequest("timeout_s needs autostart")
        env = dict(body.env or {})
        password = env.pop("POSTGRES_PASSWORD", None)
        if password is not None and not (8 <= len(password) <= 256):
            raise InvalidRequest("POSTGRES_PASSWORD must be 8 to 256 characters")
        unused = sorted(k for k in env if k not in ("POSTGRES_USER", "POSTGRES_DB"))
        if "POSTGRES_USER" in env and env["POSTGRES_USER"] != (body.name or env["POSTGRES_USER"]):
            raise InvalidRequest("POSTGRES_USER must equal the instance name: the database and its role share it")
        if "POSTGRES_DB" in env and env["POSTGRES_DB"] != (body.name or env["POSTGRES_DB"]):
            raise InvalidRequest("POSTGRES_DB must equal the instance name")
        if unused:
            out.warnings.append(f"environment variables {', '.join(unused)} are recorded but not applied to Postgres")
        if body.volumes:
            raise InvalidRequest("volumes cannot be attached: a database's data volume is created with it")
        if body.replicas:
            raise InvalidRequest("replicas are not supported: create one database per request")
        if body.features:
            raise InvalidRequest(f"features {body.features} are not supported")
        if body.args:
            raise InvalidRequest("args are not supported: pgfleet runs its own Postgres command line")
        for tag in body.tags or []:
            if not isinstance(tag, str) or not 1 <= len(tag) <= 128:
                raise InvalidRequest("each tag must be a string of 1 to 128 characters")
        stz = body.scale_to_zero
        policy, cooldown, stateful = "off", UKC_DEFAULT_COOLDOWN_MS, False
        if stz is not None:
            policy, cooldown, stateful = stz.policy, stz.cooldown_time_ms, stz.stateful
            if policy == "idle" and not ctx.fleet.keeps_sessions_across_suspend:
                policy = "on"
                out.warnings.append(f"scale_to_zero policy 'idle' runs as 'on' on the {ctx.fleet.driver_name} driver: "
                                    "a database with an open session is never scaled to zero")
        if body.service_group is not None:
            out.warnings.append("service_group is ignored: every database is published on the pgfleet proxy")
        name = body.name
        if name is None:
            for _ in range(20):
                name = _random_name()
                if ctx.fleet.find(name) is None:
                    break
        ref = {"name": name}
        meta = {"env": {k: v for k, v in env.items()}, "stateful": stateful, "tags": list(body.tags or [])}
        if password is not None:
            meta["env"]["POSTGRES_PASSWORD"] = "********"
        created = await ctx.fleet.create(
            name, memory_mb=body.memory_mb, cooldown_ms=cooldown, policy=policy, image=image,
            password=password, autostart=body.autostart, tags={"ukc": meta},
        )
        row = created.row
        if not body.autostart:
            row = await ctx.fleet.stop(row.uuid, drain_timeout_s=0)
        item = await detailed(ctx, row)
        if password is None:
            item["pgfleet"]["password"] = created.password  # shown once, as in /v1/databases
        out.ok(item)
    except (InvalidRequest, AlreadyExists, QuotaExceeded, ItemError) as exc:
        out.fail(exc, ref)
    return out.response(single=True)


# --- read -----------------------------------------------------------------------------
def _sorted_rows(ctx: ApiContext, order: str, tags: list[str]) -> list[InstanceRow]:
    rows = sorted(ctx.fleet.list(), key=lambda r: (r.created_at, r.uuid), reverse=(order == "desc"))
    if tags:
        rows = [r for r in rows if set(tags) <= set(_meta(r).get("tags", []))]
    return rows


@router.get("", summary="List instances, or get some by uuid/name")
async def list_instances(
    request: Request,
    uuid: list[str] | None = Query(None, max_length=100),
    name: list[str] | None = Query(None, max_length=100),
    details: bool = True,
    count: int | None = Query(None, ge=1, le=10_000),
    from_: str | None = Query(None, alias="from", max_length=64),
    order: Literal["asc", "desc"] = "asc",
    sortby: Literal["create_time"] = "create_time",
    tags: str | None = Query(None, max_length=4096),
    body: list[RefItem] | None = Body(None, max_length=100),
):
    ctx = ctx_of(request)
    out = Outcome(KEY)
    refs = query_refs(uuid, name) + as_items(body)
    if refs:
        for ref in refs:
            try:
                out.ok(await detailed(ctx, resolve(ctx, ref), details))
            except (NotFound, InvalidRequest) as exc:
                out.fail(exc, ref)
        return out.response()
    rows = _sorted_rows(ctx, order, [t for t in (tags or "").split(",") if t])
    if from_ is not None:
        at = next((i for i, r in enumerate(rows) if r.uuid == from_), None)
        rows = rows[at:] if at is not None else []
    if count is not None:
        rows = rows[:count]
    for row in rows:
        out.ok(await detailed(ctx, row, details))
    return out.response()


async def get_instance(request: Request, uuid: str, details: bool = True):
    ctx = ctx_of(request)
    out = Outcome(KEY)
    try:
        out.ok(await detailed(ctx, resolve(ctx, {"uuid": uuid}), details))
    except NotFound as exc:
        out.fail(exc, {"uuid": uuid})
    return out.response(single=True)


# --- lifecycle ---------------------------------------------------------------------------
async def _start(ctx: ApiContext, row: InstanceRow, item: dict) -> dict:
    previous = row.state
    if row.state == State.RUNNING:
        return brief(row, previous)
    row = await ctx.fleet.resume(row.uuid)
    return brief(row, previous)


async def _stop(ctx: ApiContext, row: InstanceRow, item: dict) -> dict:
    previous = row.state
    if item.get("ifstate") and item["ifstate"] != row.state:
        return brief(row, previous)
    row = await ctx.fleet.stop(row.uuid, drain_timeout_s=_drain_seconds(item.get("drain_timeout_ms"),
                                                                          bool(item.get("force"))))
    return brief(row, previous)


async def _suspend(ctx: ApiContext, row: InstanceRow, item: dict) -> dict:
    previous = row.state
    if row.state == State.STOPPED:
        raise ItemError(409, f"instance {row.name!r} is stopped: start it first")
    row = await ctx.fleet.suspend(row.uuid, reason="suspended by user",
                                  drain_timeout_s=_drain_seconds(item.get("drain_timeout_ms")))
    return brief(row, previous)


async def _delete(ctx: ApiContext, row: InstanceRow, item: dict) -> dict:
    previous = row.state
    await ctx.fleet.delete(row.uuid)
    return {"uuid": row.uuid, "name": row.name, "previous_state": previous}


async def _each(ctx: ApiContext, items: list[dict], op, single: bool = False):
    out = Outcome(KEY)
    if not items:
        out.fail(InvalidRequest("the request names no instance"))
        return out.response(single=True)

    async def one(item: dict):
        ref = {k: item.get(k) for k in ("uuid", "name")}
        try:
            row = resolve(ctx, ref)
            return ref, await op(ctx, row, item), None
        except Exception as exc:  # noqa: BLE001 - FleetErrors become item errors, others re-raise below
            return ref, None, exc

    for ref, result, exc in await asyncio.gather(*(one(i) for i in items)):
        if exc is None:
            out.ok(result)
        else:
            out.fail(exc, ref)  # re-raises what is not a FleetError/ItemError
    return out.response(single=single)


def _bulk_route(path: str, op, model, summary: str, method: str = "put"):
    async def bulk(request: Request, body: list[model] | model = Body(...)):  # type: ignore[valid-type]
        return await _each(ctx_of(request), as_items(body), op)

    async def by_uuid(request: Request, uuid: str, body: model | None = Body(None)):  # type: ignore[valid-type]
        item = as_items(body)[0] if body is not None else {}
        item.pop("name", None)
        item["uuid"] = uuid
        return await _each(ctx_of(request), [item], op, single=True)

    bulk.__name__ = f"{summary.lower().replace(' ', '_')}_bulk"
    by_uuid.__name__ = f"{summary.lower().replace(' ', '_')}_by_uuid"
    getattr(router, method)(path or "", summary=summary)(bulk)
    getattr(router, method)("/{uuid}" + path, summary=f"{summary} by UUID")(by_uuid)


_bulk_route("/start", _start, StartItem, "Start instances")
_bulk_route("/stop", _stop, StopItem, "Stop instances")
_bulk_route("/suspend", _suspend, SuspendItem, "Suspend instances")
_bulk_route("", _delete, DeleteItem, "Delete instances", method="delete")


# --- update ---------------------------------------------------------------------------
async def _patch_one(ctx: ApiContext, row: InstanceRow, item: dict) -> dict:
    prop, op, value = item["prop"], item["op"], item.get("value")
    meta = dict(_meta(row))
    if prop == "memory_mb":
        if op != "set" or not isinstance(value, int) or isinstance(value, bool):
            raise InvalidRequest("memory_mb takes op 'set' with an integer value")
        await ctx.fleet.update(row.uuid, memory_mb=value)
    elif prop == "scale_to_zero":
        if op != "set" or not isinstance(value, dict):
            raise InvalidRequest("scale_to_zero takes op 'set' with an object value")
        try:
            stz = ScaleToZeroIn.model_validate({"cooldown_time_ms": row.cooldown_ms, **value})
        except Exception as exc:
            raise InvalidRequest(f"invalid scale_to_zero: {exc}") from None
        meta["stateful"] = stz.stateful
        idle_ok = ctx.fleet.keeps_sessions_across_suspend
        await ctx.fleet.update(row.uuid, policy="on" if stz.policy == "idle" and not idle_ok else stz.policy,
                               cooldown_ms=stz.cooldown_time_ms)
        ctx.fleet.set_tags(row.uuid, {**row.tags, "ukc": meta})
    elif prop == "tags":
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) and 1 <= len(v) <= 128 for v in values) or len(values) > 64:
            raise InvalidRequest("tags are strings of 1 to 128 characters")
        current = list(meta.get("tags", []))
        if op == "set":
            current = list(dict.fromkeys(values))
        elif op == "add":
            current = list(dict.fromkeys(current + values))
        else:
            current = [t for t in current if t not in values]
        meta["tags"] = current
        ctx.fleet.set_tags(row.uuid, {**row.tags, "ukc": meta})
    else:
        raise ItemError(400, f"property {prop!r} cannot be changed on a pgfleet database")
    row = ctx.fleet.get(row.uuid)
    out = {"uuid": row.uuid, "name": row.name}
    if item.get("id") is not None:
        out["id"] = item["id"]
    return out


@router.patch("", summary="Update instances")
async def update_instances(request: Request, body: list[PatchItem] | PatchItem = Body(...)):
    return await _each(ctx_of(request), as_items(body), _patch_one)


@router.patch("/{uuid}", summary="Update an instance by UUID")
async def update_instance(request: Request, uuid: str, body: list[PatchItem] | PatchItem = Body(...)):
    items = as_items(body)
    for item in items:
        item.pop("name", None)
        item["uuid"] = uuid
    return await _each(ctx_of(request), items, _patch_one, single=True)


# --- wait -----------------------------------------------------------------------------
async def _wait_all(ctx: ApiContext, items: list[dict], single: bool = False):
    out = Outcome(KEY)
    if not items:
        out.fail(InvalidRequest("the request names no instance"))
        return out.response(single=True)

    async def one(item: dict):
        ref = {k: item.get(k) for k in ("uuid", "name")}
        try:
            row = resolve(ctx, ref)
        except (NotFound, InvalidRequest) as exc:
            return ref, None, exc, False
        want = item.get("state") or "running"
        timeout = _wait_seconds(item.get("timeout_s"), item.get("timeout_ms"), MAX_WAIT_S)
        try:
            row = await ctx.fleet.wait_for(row.uuid, lambda r: r.state == want and not r.deleting, timeout)
        except NotFound:
            if want == "deleted":
                return ref, {"uuid": row.uuid, "name": row.name, "state": "deleted"}, None, False
            return ref, None, NotFound(f"instance {row.name!r} was deleted while waiting"), False
        return ref, brief(row), None, row.state != want

    for ref, result, exc, lapsed in await asyncio.gather(*(one(i) for i in items)):
        if exc is not None:
            out.fail(exc, ref)
        elif lapsed:
            out.timed_out = True
            out.items.append({"status": "error", "message": "Operation timed out", **result})
        else:
            out.ok(result)
    return out.response(single=single)


@router.get("/wait", summary="Wait for instances to reach a state")
async def wait_instances(
    request: Request,
    uuid: list[str] | None = Query(None, max_length=100),
    name: list[str] | None = Query(None, max_length=100),
    state: list[Literal[tuple(s.value for s in State)]] | None = Query(None, max_length=100),  # type: ignore[valid-type]
    timeout_ms: list[Annotated[int, Field(ge=-1, le=MAX_WAIT_S * 1000)]] | None = Query(None, max_length=100),
    timeout_s: list[Annotated[int, Field(ge=-1, le=MAX_WAIT_S)]] | None = Query(None, max_length=100),
    body: list[WaitItem] | WaitItem | None = Body(None),
):
    items = as_items(body)
    for i, ref in enumerate(query_refs(uuid, name)):
        item = dict(ref)
        for key, values in (("state", state), ("timeout_ms", timeout_ms), ("timeout_s", timeout_s)):
            if values:
                item[key] = values[min(i, len(values) - 1)]
        items.append(WaitItem.model_validate(item).model_dump(exclude_unset=True))
    return await _wait_all(ctx_of(request), items)


@router.get("/{uuid}/wait", summary="Wait for an instance to reach a state")
async def wait_instance(request: Request, uuid: str, body: WaitItem | None = Body(None)):
    item = as_items(body)[0] if body is not None else {}
    item.pop("name", None)
    item["uuid"] = uuid
    return await _wait_all(ctx_of(request), [item], single=True)


# --- logs and metrics -----------------------------------------------------------------
async def _log(ctx: ApiContext, row: InstanceRow, item: dict) -> dict:
    path = ctx.fleet.log_path(row)
    data = b""
    size = 0
    offset = item.get("offset") or 0
    limit = item.get("limit") if item.get("limit") is not None else 4096
    if path is not None and path.exists():
        size = path.stat().st_size
        start = max(0, size + offset) if offset < 0 else min(offset, size)
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(limit)
    else:
        start = 0
    return {
        "uuid": row.uuid, "name": row.name, "state": row.state,
        "output": base64.b64encode(data).decode(),
        "available": {"start": 0, "end": size},
        "range": {"start": start, "end": start + len(data)},
    }


@router.get("/log", summary="Get instances' logs")
async def get_logs(
    request: Request,
    uuid: list[str] | None = Query(None, max_length=100),
    name: list[str] | None = Query(None, max_length=100),
    offset: list[Annotated[int, Field(ge=-(1 << 40), le=1 << 40)]] | None = Query(None, max_length=100),
    limit: list[Annotated[int, Field(ge=0, le=MAX_LOG_BYTES)]] | None = Query(None, max_length=100),
    body: list[LogItem] | LogItem | None = Body(None),
):
    items = as_items(body)
    for i, ref in enumerate(query_refs(uuid, name)):
        item = dict(ref)
        if offset:
            item["offset"] = offset[min(i, len(offset) - 1)]
        if limit:
            item["limit"] = limit[min(i, len(limit) - 1)]
        items.append(LogItem.model_validate(item).model_dump(exclude_unset=True))
    return await _each(ctx_of(request), items, _log)


@router.get("/{uuid}/log", summary="Get an instance's log by UUID")
async def get_log(request: Request, uuid: str, body: LogItem | None = Body(None)):
    item = as_items(body)[0] if body is not None else {}
    item.pop("name", None)
    item["uuid"] = uuid
    return await _each(ctx_of(request), [item], _log, single=True)


async def _metrics(ctx: ApiContext, row: InstanceRow, item: dict) -> dict:
    sessions = ctx.fleet.sessions(row.uuid)
    usage = await ctx.fleet.usage(row)
    return {
        "uuid": row.uuid, "name": row.name,
        "rss_bytes": int(usage.get("rss_bytes", 0)),
        "cpu_time_ms": int(usage.get("cpu_time_ms", 0)),
        "boot_time_us": row.boot_time_us or 0,
        "nconns": sessions.open,
        "ntotal": sessions.total,
    }


@router.get("/metrics", summary="Get instances' metrics")
async def get_metrics(
    request: Request,
    uuid: list[str] | None = Query(None, max_length=100),
    name: list[str] | None = Query(None, max_length=100),
):
    ctx = ctx_of(request)
    refs = query_refs(uuid, name) or [{"uuid": r.uuid} for r in ctx.fleet.list()]
    if not refs:
        return Outcome(KEY).response()
    return await _each(ctx, refs, _metrics)


@router.get("/{uuid}/metrics", summary="Get an instance's metrics by UUID")
async def get_instance_metrics(request: Request, uuid: str):
    return await _each(ctx_of(request), [{"uuid": uuid}], _metrics, single=True)


# registered last: "/{uuid}" would otherwise shadow /wait, /log and /metrics
router.get("/{uuid}", summary="Get an instance by UUID")(get_instance)
