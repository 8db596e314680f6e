"""Branches, backups and point-in-time restore: /v1/databases/{ref}/branches, /backups, /restore."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from pgfleet.fleet.branches import DAY_S, Backups, Branches, parse_time

from .common import ApiError, envelope
from .databases import database_json

router = APIRouter(prefix="/v1/databases", tags=["branches"])


class CreateBranch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=1024)
    at: str | None = Field(None, max_length=64, description="ISO 8601 time inside the restore window")
    lsn: str | None = Field(None, max_length=32, description="a WAL position, e.g. 0/16B3748")


class RestoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    at: str = Field(max_length=64, description="ISO 8601 time inside the restore window")


class BackupSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    retention_days: float = Field(gt=0, le=366)


def _backups(request: Request) -> Backups:
    backups = request.app.state.ctx.fleet.backups
    if backups is None:
        driver = request.app.state.ctx.fleet.driver_name
        raise ApiError(501, f"backups and branches are not available with the {driver} driver", "unsupported")
    return backups


@router.post("/{ref}/branches", status_code=201)
async def create_branch(ref: str, body: CreateBranch, request: Request):
    """A new database holding `ref`'s data as of now, or of `at` / `lsn` in its restore window."""
    started = time.perf_counter()
    ctx = request.app.state.ctx
    backups = _backups(request)
    at = parse_time(body.at) if body.at is not None else None
    created = await Branches(ctx.fleet, backups).branch(ref, body.name, at=at, lsn=body.lsn)
    return envelope(database_json(ctx, created.row, created.password), started, status=201)


@router.get("/{ref}/backups")
async def list_backups(ref: str, request: Request):
    """The restore window, base backups and archived WAL of a database (also a deleted one)."""
    started = time.perf_counter()
    return envelope(_backups(request).describe(ref), started)


@router.post("/{ref}/backups", status_code=201)
async def take_backup(ref: str, request: Request):
    """Take a base backup now."""
    started = time.perf_counter()
    backups = _backups(request)
    await backups.take_base_backup(ref)
    return envelope(backups.describe(ref), started, status=201)


@router.patch("/{ref}/backups")
async def patch_backups(ref: str, body: BackupSettings, request: Request):
    started = time.perf_counter()
    backups = _backups(request)
    backups.set_retention(ref, int(body.retention_days * DAY_S))
    return envelope(backups.describe(ref), started)


@router.delete("/{ref}/backups")
async def purge_backups(ref: str, request: Request):
    """Remove a deleted database's backups now, before its retention ends."""
    started = time.perf_counter()
    backups = _backups(request)
    arch, row = backups.find(ref)
    if row is not None:
        raise ApiError(409, f"database {row.name!r} exists: its backups go with `db delete --purge`", "exists")
    backups.purge(arch.uuid)
    return envelope({"uuid": arch.uuid, "name": arch.name, "backups": "purged"}, started)


@router.post("/{ref}/restore")
async def restore(ref: str, body: RestoreRequest, request: Request):
    """Restore `ref` in place to `at`; the state it replaces is kept as a branch (`kept`)."""
    started = time.perf_counter()
    ctx = request.app.state.ctx
    restored, kept = await Branches(ctx.fleet, _backups(request)).restore(ref, parse_time(body.at))
    return envelope({"restored": database_json(ctx, restored), "kept": database_json(ctx, kept)}, started)
