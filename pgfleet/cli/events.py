"""`pgfleet events [--follow]` and `pgfleet db history NAME`: what happened, as lines."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Optional

import httpx
import typer

from .client import ApiClient, CliError


def event_line(e: dict[str, Any]) -> str:
    """`AT KIND DATABASE key=value ...` (transitions as `from -> to (reason)`)."""
    if e.get("kind") == "transition":
        detail = f"{e.get('from') or '-'} -> {e.get('to')}" + (f" ({e['reason']})" if e.get("reason") else "")
    else:
        skip = {"seq", "at", "kind", "database", "uuid"}
        detail = " ".join(f"{k}={v}" for k, v in e.items() if k not in skip and v is not None)
    words = [e.get("at") or "-", e.get("kind") or "-"]
    if e.get("database"):
        words.append(e["database"])
    return " ".join([*words, detail]).rstrip()


def _emit(e: dict, as_json: bool) -> None:
    sys.stdout.write((json.dumps(e) if as_json else event_line(e)) + "\n")
    sys.stdout.flush()


def follow(client: ApiClient, database: str | None, limit: int, as_json: bool) -> None:
    """Stream the API's Server-Sent Events until interrupted."""
    params: dict[str, Any] = {"follow": "true", "limit": limit}
    if database:
        params["database"] = database
    try:
        with client.http.stream("GET", "/v1/events", params=params, timeout=httpx.Timeout(10, read=None)) as resp:
            if resp.status_code >= 400:
                resp.read()
                try:
                    message = resp.json().get("message")
                except ValueError:
                    message = None
                raise CliError(message or f"the API answered {resp.status_code}")
            kind = None
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:") and kind == "lost":
                    raise CliError("the daemon dropped this follower (it read too slowly); run it again")
                elif line.startswith("data:"):
                    _emit(json.loads(line[5:]), as_json)
    except httpx.HTTPError as exc:
        raise CliError(f"the event stream from {client.info.api_url} ended: {exc}") from None


def register(app: typer.Typer, db_app: typer.Typer, client: Callable[[], ApiClient],
             json_opt: Any) -> None:
    @app.command("events")
    def events(database: Optional[str] = typer.Option(None, "--database", "-d", help="only this database"),
               limit: int = typer.Option(100, help="how many recent events to show first"),
               follow_: bool = typer.Option(False, "--follow", "-f", help="keep printing events as they happen"),
               as_json: bool = json_opt) -> None:
        """Show recent events (transitions, wakes with latency, failed logins, refusals)."""
        c = client()
        if follow_:
            follow(c, database, limit, as_json)
            return
        query = f"/v1/events?limit={limit}" + (f"&database={database}" if database else "")
        rows = c.call("GET", query)["events"]
        if as_json:  # one array; with --follow, one object per line
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
            return
        for e in rows:
            _emit(e, False)

    @app.command("console")
    def console(as_json: bool = json_opt) -> None:
        """Print the web console's address, with the token in its fragment (never sent to a server)."""
        c = client()
        token = c.http.headers["Authorization"].split(" ", 1)[1]
        url = f"{c.info.api_url}/console#token={token}"
        if as_json:
            sys.stdout.write(json.dumps({"url": url}) + "\n")
        else:
            sys.stdout.write(url + "\n")

    @db_app.command("history")
    def history(name: str, limit: int = typer.Option(100, help="how many events"),
                as_json: bool = json_opt) -> None:
        """A database's lifecycle history and recent events, newest first."""
        data = client().call("GET", f"/v1/databases/{name}/history?limit={limit}")
        if as_json:
            sys.stdout.write(json.dumps(data["events"], indent=2) + "\n")
            return
        for e in data["events"]:
            sys.stdout.write(event_line(e) + "\n")
