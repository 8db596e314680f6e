"""What every API route shares: the envelope, errors, token auth, the request context."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import AfterValidator

from pgfleet.fleet.manager import Fleet

MAX_BODY_BYTES = 1 << 20
#: the longest string any field of a request body takes (names, tags, env values, nested
#: JSON); strings in the URL are bounded by the HTTP server's request-line limit
MAX_STRING = 4096
#: how deep free-form JSON fields (volumes, domains, patch values) may nest
MAX_JSON_DEPTH = 16


def bounded_json(value: Any, depth: int = 0) -> Any:
    """A free-form JSON value whose every string (and key) is at most MAX_STRING long."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise ValueError(f"a string of {len(value)} characters is longer than {MAX_STRING}")
    elif isinstance(value, dict):
        for k, v in value.items():
            bounded_json(k, depth + 1)
            bounded_json(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            bounded_json(v, depth + 1)
    return value


#: for `Any` fields of request models: every string in them bounded like the typed ones
BoundedJSON = Annotated[Any, AfterValidator(bounded_json)]


@dataclass
class ApiContext:
    """What the API needs from the daemon besides the fleet."""

    fleet: Fleet
    token: str
    public_host: str
    port: int
    pooled_port: int
    driver: str
    home: str
    proxy_stats: Any = None
    ca_file: str | None = None
    domain: str | None = None
    #: the listeners by name ("direct", "pooled"), read on a metrics scrape
    proxies: dict[str, Any] | None = None
    #: how a branch copies its parent's files (drivers/cowstore.BranchStorage.to_json)
    branch_storage: dict[str, Any] | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def envelope(data: Any, started: float | None = None, status: int = 200) -> JSONResponse:
    body: dict[str, Any] = {"status": "success", "data": data}
    if started is not None:
        body["op_time_us"] = int((time.perf_counter() - started) * 1e6)
    return JSONResponse(body, status_code=status)


def error_body(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse(
        {"status": "error", "message": message, "code": code,
         "errors": [{"status": status, "message": message}]},
        status_code=status,
    )


def check_token(request: Request, expected: str) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise ApiError(401, "missing or invalid bearer token", "unauthorized")


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")
