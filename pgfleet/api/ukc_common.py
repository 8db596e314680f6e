"""Shared pieces of the Unikraft Cloud-compatible API: envelope, per-item results, references.

Conventions (see docs/api.md):
- every answer is `{"status", "message"?, "data"?, "errors"?, "warnings"?, "op_time_us"}`;
- bulk calls (`/v1/<resource>` with a body or filters) answer HTTP 200 and report each
  item with its own `status`; an item that failed carries `error` (8 = not found,
  23 = already exists, otherwise the HTTP status it would have had) and `message`;
  the envelope says `success`, `partial_success` or `error`;
- calls on one resource (`/v1/<resource>/{uuid}`) answer the failure's HTTP status
  (400, 404, 409, 429, 503) with the same envelope.
"""

from __future__ import annotations

import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from pgfleet.fleet.errors import AlreadyExists, FleetError, InvalidRequest, NotFound
from pgfleet.store import InstanceRow

from .common import MAX_STRING, ApiContext

NOT_FOUND_CODE = 8
ALREADY_EXISTS_CODE = 23

#: names of derived resources (service groups, volumes) are uuid5s in this namespace
NAMESPACE = uuidlib.UUID("5b7f1c0e-8d9a-4f57-9a1b-3f0d2c6a7e11")


class Strict(BaseModel):
    # wrong types are errors, not coerced; no string longer than MAX_STRING anywhere in it
    model_config = ConfigDict(extra="forbid", strict=True, str_max_length=MAX_STRING)


class NameOrUUID(Strict):
    uuid: str | None = Field(None, max_length=64)
    name: str | None = Field(None, max_length=253)


class ItemError(Exception):
    """One item of a request failed; `code` is the API's error number."""

    def __init__(self, http: int, message: str, code: int | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.http = http
        self.code = code if code is not None else http
        self.extra = extra


def item_error_from(exc: Exception) -> ItemError:
    if isinstance(exc, ItemError):
        return exc
    if isinstance(exc, NotFound):
        return ItemError(404, str(exc), NOT_FOUND_CODE)
    if isinstance(exc, AlreadyExists):
        return ItemError(409, str(exc), ALREADY_EXISTS_CODE)
    if isinstance(exc, FleetError):
        return ItemError(exc.http, str(exc))
    raise exc


@dataclass
class Outcome:
    """What a request produced: successful items, failed items, warnings."""

    key: str
    started: float = field(default_factory=time.perf_counter)
    items: list[dict] = field(default_factory=list)
    failures: list[ItemError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    timed_out: bool = False

    def ok(self, item: dict) -> None:
        self.items.append({"status": "success", **item})

    def fail(self, exc: Exception, ref: dict | None = None) -> None:
        err = item_error_from(exc)
        self.failures.append(err)
        entry = {"status": "error", "error": err.code, "message": str(err)}
        for k in ("uuid", "name"):
            if ref and ref.get(k) is not None:
                entry[k] = ref[k]
        entry.update(err.extra)
        self.items.append(entry)

    def response(self, single: bool = False) -> JSONResponse:
        """The envelope. `single`: a per-UUID call answers a failure with its HTTP status."""
        failed = sum(1 for i in self.items if i.get("status") == "error")  # failures and lapsed waits
        if failed == 0:
            status = "success"
        elif failed < len(self.items):
            status = "partial_success"
        else:
            status = "error"
        body: dict[str, Any] = {"status": status, "data": {self.key: self.items}}
        http = 200
        if self.timed_out:
            body["message"] = "Operation timed out"
        elif self.failures:
            body["message"] = "; ".join(dict.fromkeys(str(f) for f in self.failures))
            if single and status == "error" and len(self.failures) == failed:
                # one resource: the failure is the answer's HTTP status, and `errors` says it again
                body["errors"] = [{"status": f.http, "message": str(f)} for f in self.failures]
                http = self.failures[0].http
            # bulk: each failed item carries its own status, error code and message
        if self.warnings:
            body["warnings"] = [{"message": w} for w in self.warnings]
        body["op_time_us"] = int((time.perf_counter() - self.started) * 1e6)
        return JSONResponse(body, status_code=http)


def ctx_of(request: Request) -> ApiContext:
    return request.app.state.ctx


def derived_uuid(kind: str, instance_uuid: str) -> str:
    return str(uuidlib.uuid5(NAMESPACE, f"{kind}:{instance_uuid}"))


def resolve(ctx: ApiContext, ref: dict) -> InstanceRow:
    """The database a `{uuid}` or `{name}` reference names (both must agree if both given)."""
    uuid, name = ref.get("uuid"), ref.get("name")
    if uuid is None and name is None:
        raise InvalidRequest("each item needs a uuid or a name")
    row = None
    if uuid is not None:
        row = ctx.fleet.find_uuid(uuid)
        if row is None:
            raise NotFound(f"no instance with uuid {uuid!r}")
        if name is not None and row.name != name:
            raise NotFound(f"no instance with uuid {uuid!r} and name {name!r}")
        return row
    row = ctx.fleet.find(name)  # type: ignore[arg-type]
    if row is None:
        raise NotFound(f"no instance named {name!r}")
    return row


def as_items(body: Any) -> list[dict]:
    """A bulk body is an array of items; a single object is taken as one item."""
    if body is None:
        return []
    if isinstance(body, list):
        return [b.model_dump(exclude_unset=True) if isinstance(b, BaseModel) else dict(b) for b in body]
    return [body.model_dump(exclude_unset=True) if isinstance(body, BaseModel) else dict(body)]


def query_refs(uuid: list[str] | None, name: list[str] | None) -> list[dict]:
    return [{"uuid": u} for u in uuid or []] + [{"name": n} for n in name or []]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid request (unknown field, wrong type, bad name or value)"},
    401: {"description": "Missing or invalid bearer token"},
    404: {"description": "No such resource"},
    409: {"description": "Conflict: already exists, or not possible in the current state"},
    413: {"description": "Request body too large"},
    429: {"description": "Quota exceeded"},
    503: {"description": "The database cannot serve now (being deleted, failed to start)"},
}
