"""The CLI's way to the daemon: its REST API, found through the pgfleet home."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from pgfleet.config import DaemonNotFound, find_daemon


class CliError(Exception):
    """One line for the user; the CLI exits non-zero."""


class ApiClient:
    def __init__(self, home: Path, timeout_s: float = 120.0) -> None:
        try:
            info, token = find_daemon(home)
        except DaemonNotFound as exc:
            raise CliError(str(exc)) from exc
        self.info = info
        self.http = httpx.Client(
            base_url=info.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s,
        )

    def call(self, method: str, path: str, json: Any = None) -> Any:
        try:
            resp = self.http.request(method, path, json=json)
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach the pgfleet API at {self.info.api_url}: {exc}") from exc
        try:
            body = resp.json()
        except ValueError:
            raise CliError(f"the API answered {resp.status_code} without JSON") from None
        if resp.status_code >= 400 or body.get("status") != "success":
            raise CliError(body.get("message") or f"the API answered {resp.status_code}")
        return body.get("data")
