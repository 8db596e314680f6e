"""UKC-compatible service groups, volumes and quotas, derived from pgfleet's databases.

- A database's **service group** is its listener on the pgfleet proxy (direct and pooled
  ports, routed by database name) and its domain; read-only.
- A database's **volume** is its data directory; it exists exactly as long as its
  database and is always attached to it, so create/delete/attach/detach/clone answer
  with a per-item error that says why (see docs/api.md).
- **Quotas** are pgfleet.fleet.quotas: real limits, enforced on create and start.
"""


import asyncio
import os
import shutil
from pathlib import Path
from typing import Any, Awaitable, Callable

from fastapi import APIRouter, Body, Query, Request
from pydantic import Field

from pgfleet.fleet import states
from pgfleet.fleet.errors import InvalidRequest, NotFound
from pgfleet import settings as S
from pgfleet.store import InstanceRow

from .common import ApiContext, iso
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
)

services = APIRouter(prefix="/v1/services", tags=["ukc: services"], responses=ERROR_RESPONSES)
volumes = APIRouter(prefix="/v1/volumes", tags=["ukc: volumes"], responses=ERROR_RESPONSES)
users = APIRouter(prefix="/v1/users", tags=["ukc: users"], responses=ERROR_RESPONSES)

MiB = 1 << 20


def _find_derived(ctx: ApiContext, kind: str, suffix: str, ref: dict) -> InstanceRow:
    uuid, name = ref.get("uuid"), ref.get("name")
    if uuid is None and name is None:
        raise InvalidRequest("each item needs a uuid or a name")
    for row in ctx.fleet.list():
        if uuid is not None and derived_uuid(kind, row.uuid) != uuid:
            continue
        if name is not None and f"{row.name}{suffix}" != name:
            continue
        return row
    what = f"uuid {uuid!r}" if uuid is not None else f"name {name!r}"
    raise NotFound(f"no {'service group' if kind == 'service' else 'volume'} with {what}")


# --- service groups ---------------------------------------------------------------------
def service_json(ctx: ApiContext, row: InstanceRow) -> dict:
    return {
        "uuid": derived_uuid("service", row.uuid),
        "name": f"{row.name}-svc",
        "created_at": iso(row.created_at),
        "persistent": False,
        "autoscale": False,
        "services": [
            {"port": ctx.port, "destination_port": 5432, "protocol": "tcp", "handlers": []},
            {"port": ctx.pooled_port, "destination_port": 5432, "protocol": "tcp", "handlers": []},
        ],
        "domains": [{"fqdn": f"{row.name}.{ctx.public_host}"}],
        "instances": [{"uuid": row.uuid, "name": row.name}],
    }


@services.get("", summary="List service groups (one per database)")
async def list_services(
    request: Request,
    uuid: list[str] | None = Query(None, max_length=100),
    name: list[str] | None = Query(None, max_length=100),
    details: bool = True,
    body: list[NameOrUUID] | None = Body(None, max_length=100),
):
    ctx = ctx_of(request)

    async def present(row: InstanceRow) -> dict:
        return service_json(ctx, row)
    return await _list_derived(ctx, "service_groups", "service", "-svc", query_refs(uuid, name) + as_items(body),
                               present)


async def _list_derived(ctx: ApiContext, key: str, kind: str, suffix: str, refs: list[dict],
                        present: Callable[[InstanceRow], Awaitable[dict]]):
    """The service groups or volumes named in refs (a per-item error for each unknown one),
    or all of them, oldest database first."""
    out = Outcome(key)
    if refs:
        for ref in refs:
            try:
                out.ok(await present(_find_derived(ctx, kind, suffix, ref)))
            except (NotFound, InvalidRequest) as exc:
                out.fail(exc, ref)
        return out.response()
    for row in sorted(ctx.fleet.list(), key=lambda r: r.created_at):
        out.ok(await present(row))
    return out.response()


@services.get("/{uuid}", summary="Get a service group by UUID")
async def get_service(request: Request, uuid: str):
    ctx = ctx_of(request)
    out = Outcome("service_groups")
    try:
        out.ok(service_json(ctx, _find_derived(ctx, "service", "-svc", {"uuid": uuid})))
    except NotFound as exc:
        out.fail(exc, {"uuid": uuid})
    return out.response(single=True)


# --- volumes ----------------------------------------------------------------------------
def _du_mb(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return (total + MiB - 1) // MiB


async def volume_json(ctx: ApiContext, row: InstanceRow) -> dict:
    size = await asyncio.to_thread(_du_mb, ctx.fleet.data_path(row))
    live = row.state in states.LIVE
    return {
        "uuid": derived_uuid("volume", row.uuid),
        "name": f"{row.name}-data",
        "created_at": iso(row.created_at),
        "state": "mounted" if live else "idle",
        "size_mb": size,
        "persistent": True,
        "attached_to": [{"uuid": row.uuid, "name": row.name}],
        "mounted_by": [{"uuid": row.uuid, "name": row.name, "readonly": False}] if live else [],
        "tags": [],
        "quota_policy": "dynamic",
        "filesystem": "host",
    }


class CreateVolume(Strict):
    name: str | None = Field(None, max_length=63)
    size_mb: int | None = Field(None, ge=1, le=1 << 24)
    template: NameOrUUID | None = None
    quota_policy: str | None = Field(None, max_length=16)
    filesystem: str | None = Field(None, max_length=32)
    tags: list[str] | None = Field(None, max_length=64)


class AttachItem(NameOrUUID):
    attach_to: NameOrUUID
    at: str = Field(max_length=4096)
    readonly: bool | None = None


class DetachItem(NameOrUUID):
    from_: NameOrUUID | None = Field(None, alias="from")


class CloneItem(NameOrUUID):
    vol_name: str | None = Field(None, max_length=63)
    tags: list[str] | None = Field(None, max_length=64)


@volumes.get("", summary="List volumes (one data volume per database)")
async def list_volumes(
    request: Request,
    uuid: list[str] | None = Query(None, max_length=100),
    name: list[str] | None = Query(None, max_length=100),
    details: bool = True,
    body: list[NameOrUUID] | None = Body(None, max_length=100),
):
    ctx = ctx_of(request)
    return await _list_derived(ctx, "volumes", "volume", "-data", query_refs(uuid, name) + as_items(body),
                               lambda row: volume_json(ctx, row))


@volumes.post("", summary="Create a volume (not possible on its own: see docs/api.md)")
async def create_volume(request: Request, body: CreateVolume):
    out = Outcome("volumes")
    out.fail(ItemError(400, "a volume cannot be created on its own: each database's data volume is created with "
                            "the database (POST /v1/instances) and named <name>-data"), {"name": body.name})
    return out.response(single=True)


def _in_use(ctx: ApiContext, ref: dict, verb: str) -> None:
    row = _find_derived(ctx, "volume", "-data", ref)
    if verb == "cloned":
        raise ItemError(409, f"volume {row.name}-data cannot be cloned: cloning a database's data is not offered "
                             "yet")
    raise ItemError(409, f"volume {row.name}-data is the data volume of instance {row.name!r} and cannot be "
                         f"{verb}; it goes with its database")


def _volume_route(path: str, model, verb: str, summary: str, method: str):
    async def bulk(request: Request, body: list[model] | model = Body(...)):  # type: ignore[valid-type]
        ctx = ctx_of(request)
        out = Outcome("volumes")
        for item in as_items(body):
            ref = {k: item.get(k) for k in ("uuid", "name")}
            try:
                _in_use(ctx, ref, verb)
            except (NotFound, InvalidRequest, ItemError) as exc:
                out.fail(exc, ref)
        return out.response()

    async def by_uuid(request: Request, uuid: str, body: model | None = Body(None)):  # type: ignore[valid-type]
        out = Outcome("volumes")
        try:
            _in_use(ctx_of(request), {"uuid": uuid}, verb)
        except (NotFound, ItemError) as exc:
            out.fail(exc, {"uuid": uuid})
        return out.response(single=True)

    bulk.__name__ = f"{verb}_volumes"
    by_uuid.__name__ = f"{verb}_volume_by_uuid"
    getattr(volumes, method)(path or "", summary=summary)(bulk)
    getattr(volumes, method)("/{uuid}" + path, summary=f"{summary} by UUID")(by_uuid)


_volume_route("", NameOrUUID, "deleted", "Delete volumes (only with their database)", "delete")
_volume_route("/attach", AttachItem, "attached", "Attach volumes (a data volume stays with its database)", "put")
_volume_route("/detach", DetachItem, "detached", "Detach volumes (a data volume stays with its database)", "put")
_volume_route("/clone", CloneItem, "cloned", "Clone volumes (not yet supported)", "post")


async def get_volume(request: Request, uuid: str):
    ctx = ctx_of(request)
    out = Outcome("volumes")
    try:
        out.ok(await volume_json(ctx, _find_derived(ctx, "volume", "-data", {"uuid": uuid})))
    except NotFound as exc:
        out.fail(exc, {"uuid": uuid})
    return out.response(single=True)


volumes.get("/{uuid}", summary="Get a volume by UUID")(get_volume)


# --- quotas -----------------------------------------------------------------------------
@users.get("/quotas", summary="Quotas: limits and what is in use")
async def get_quotas(request: Request):
    ctx = ctx_of(request)
    q, used = ctx.fleet.quota_usage()
    rows = ctx.fleet.list()
    sizes = await asyncio.gather(*(asyncio.to_thread(_du_mb, ctx.fleet.data_path(r)) for r in rows))
    disk_mb = shutil.disk_usage(ctx.home).total // MiB
    hard: dict[str, Any] = {
        **q.hard(), "live_vcpus": q.live_instances,
        "service_groups": q.instances, "services": 2 * q.instances, "volumes": q.instances,
        "total_volume_mb": disk_mb,
    }
    used.update({"service_groups": len(rows), "services": 2 * len(rows), "volumes": len(rows),
                 "total_volume_mb": sum(sizes)})
    out = Outcome("quotas")
    out.ok({
        "uuid": derived_uuid("user", ctx.home),
        "used": used,
        "hard": hard,
        "limits": {"min_memory_mb": S.MEMORY_MB.min, "max_memory_mb": S.MEMORY_MB.max, "min_vcpus": 1, "max_vcpus": 1},
    })
    return out.response()
