"""`pgfleet`: the command line. Human output is a table; `--json` is for scripts.
Every failure is one line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.table import Table

from pgfleet import __version__
from pgfleet import settings as S
from pgfleet.config import (
    DEFAULT_API, DEFAULT_LISTEN, DEFAULT_LISTEN_HTTP, DEFAULT_LISTEN_POOLED, DaemonInfo, ensure_token, pid_alive,
    resolve_home, token_path, use_home,
)

from . import pgpass
from .branches import register as _register_branches
from .client import ApiClient, CliError

app = typer.Typer(help="pgfleet: serverless Postgres on your own hosts.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
db_app = typer.Typer(help="Create and manage databases.", no_args_is_help=True)
app.add_typer(db_app, name="db")

out = Console()
err = Console(stderr=True)

HomeOpt = typer.Option(None, "--home", help="pgfleet home (default: $PGFLEET_HOME, else a standard data dir)")
JsonOpt = typer.Option(False, "--json", help="machine-readable output")


def _home(home: Path | None) -> Path:
    return resolve_home(home)


def _client(home: Path | None = None) -> ApiClient:
    return ApiClient(_home(home))


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@app.callback()
def _root(home: Optional[Path] = HomeOpt,
          version: bool = typer.Option(False, "--version", help="print the version and exit")) -> None:
    if version:
        out.print(__version__)
        raise typer.Exit()
    if home is not None:
        use_home(home)


# --- daemon -----------------------------------------------------------------------
@app.command()
def up(
    home: Optional[Path] = HomeOpt,
    listen: str = typer.Option(DEFAULT_LISTEN, help="proxy listener (one server session per client)"),
    listen_pooled: str = typer.Option(DEFAULT_LISTEN_POOLED, help="pooled listener"),
    api: str = typer.Option(DEFAULT_API, help="REST API listener"),
    listen_http: str = typer.Option(DEFAULT_LISTEN_HTTP, help="SQL over HTTP and WebSocket (Neon's serverless "
                                    "driver protocol), or 'off'"),
    http_max_request_mb: int = typer.Option(10, help="largest POST /sql body or WebSocket message, MiB"),
    http_max_response_mb: int = typer.Option(10, help="largest answer to one POST /sql, MiB"),
    http_tls: str = typer.Option("auto", help="TLS on --listen-http: on, off, or auto (off on loopback only)"),
    ws_session: str = typer.Option("direct", help="WebSocket sessions on paths other than /direct, /pooled: "
                                   "direct or pooled"),
    driver: str = typer.Option("auto", help="isolation driver: auto, sandbox or microvm"),
    tls_cert: Optional[Path] = typer.Option(None, help="TLS certificate (PEM) for the proxies"),
    tls_key: Optional[Path] = typer.Option(None, help="TLS private key (PEM)"),
    tls: bool = typer.Option(True, help="without --tls-cert: make a local CA and certificate on first start"),
    domain: str = typer.Option("db.localhost", help="SNI routing: database NAME answers at NAME.<domain>"),
    log_format: str = typer.Option("text", help="daemon.log lines: text or json"),
    detach: bool = typer.Option(False, "--detach", "-d", help="run in the background; return once it serves"),
    timeout: float = typer.Option(120.0, help="with --detach: seconds to wait for the daemon"),
    swap: Optional[str] = typer.Option(None, help="make and enable a swap file of this size (and zswap) for "
                                                  "warm standby, e.g. 4G; removed at stop"),
    memory_budget: Optional[str] = typer.Option(None, help="memory the databases may use, e.g. 16G "
                                                           "(default: 75% of RAM); beyond it idle ones are demoted"),
) -> None:
    """Run the pgfleet daemon (foreground; Ctrl-C suspends databases and stops cleanly)."""
    from pgfleet.config import parse_hostport
    from pgfleet.drivers import DRIVER_NAMES

    h = _home(home)
    if driver not in DRIVER_NAMES:
        raise CliError(f"unknown driver {driver!r}: choose one of {', '.join(DRIVER_NAMES)}")
    http_on = listen_http.lower() != "off"
    checks = [(listen, "--listen"), (listen_pooled, "--listen-pooled"), (api, "--api")]
    for value, what in checks + ([(listen_http, "--listen-http")] if http_on else []):
        try:
            parse_hostport(value, what)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    running = DaemonInfo.read(h)
    if running is not None:
        raise CliError(f"a pgfleet daemon (pid {running.pid}) is already running on {h}")
    if bool(tls_cert) != bool(tls_key):
        raise CliError("--tls-cert and --tls-key go together")
    for f in (tls_cert, tls_key):
        if f is not None and not f.is_file():
            raise CliError(f"no such file: {f}")
    if log_format not in ("text", "json"):
        raise CliError(f"unknown log format {log_format!r}: choose text or json")
    if http_tls not in ("auto", "on", "off"):
        raise CliError(f"--http-tls must be auto, on or off, not {http_tls!r}")
    if ws_session not in ("direct", "pooled"):
        raise CliError(f"--ws-session must be direct or pooled, not {ws_session!r}")
    if http_max_request_mb < 1 or http_max_response_mb < 1:
        raise CliError("--http-max-request-mb and --http-max-response-mb must be at least 1")
    from pgfleet.drivers.swap import parse_size

    sizes: dict[str, int | None] = {}
    for flag, value in (("--swap", swap), ("--memory-budget", memory_budget)):
        try:
            sizes[flag] = parse_size(value) if value is not None else None
        except ValueError as exc:
            raise CliError(f"{flag}: {exc}") from None
    extra = [f"--domain={domain}", "--tls" if tls else "--no-tls", f"--log-format={log_format}",
             f"--listen-http={listen_http}", f"--http-max-request-mb={http_max_request_mb}",
             f"--http-max-response-mb={http_max_response_mb}", f"--ws-session={ws_session}", f"--http-tls={http_tls}"]
    extra += [f"{flag}={value}" for flag, value in (("--swap", swap), ("--memory-budget", memory_budget)) if value]
    if tls_cert and tls_key:
        extra += [f"--tls-cert={tls_cert.absolute()}", f"--tls-key={tls_key.absolute()}"]
    if detach:
        _detach(h, listen, listen_pooled, api, driver, timeout, extra)
        return
    from pgfleet.daemon import AlreadyRunning, DaemonOptions, run
    from pgfleet.edge.settings import MiB, EdgeSettings

    http = EdgeSettings(max_request_bytes=http_max_request_mb * MiB, max_response_bytes=http_max_response_mb * MiB,
                        ws_session=ws_session)  # type: ignore[arg-type]

    try:
        run(DaemonOptions(home=h, listen=listen, listen_pooled=listen_pooled, api=api, driver=driver,
                          tls_cert=tls_cert, tls_key=tls_key, tls=tls, domain=domain, log_format=log_format,
                          listen_http=listen_http if http_on else None, http=http, http_tls=http_tls,
                          swap_bytes=sizes["--swap"], memory_budget_bytes=sizes["--memory-budget"]))
    except AlreadyRunning as exc:
        raise CliError(str(exc)) from None


def _detach(home: Path, listen: str, listen_pooled: str, api: str, driver: str, timeout: float,
            extra: list[str]) -> None:
    home.mkdir(parents=True, exist_ok=True)
    logf = open(home / "daemon.out", "ab")
    cmd = [sys.executable, "-m", "pgfleet.cli.main", "up", "--home", str(home), "--listen", listen,
           "--listen-pooled", listen_pooled, "--api", api, "--driver", driver, *extra]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
    deadline = time.monotonic() + timeout
    with err.status("starting the pgfleet daemon…"):
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (home / "daemon.out").read_text(errors="replace").strip().splitlines()[-1:]
                raise CliError(f"the daemon exited during start: {' '.join(tail) or 'see ' + str(home / 'daemon.log')}")
            info = DaemonInfo.read(home)
            if info is not None and info.pid == proc.pid:
                err.print(f"pgfleet is up (pid {info.pid}): proxy {info.listen}, API {info.api_url}")
                return
            time.sleep(0.05)
    proc.terminate()
    raise CliError(f"the daemon did not come up within {timeout:.0f}s (see {home / 'daemon.log'})")


@app.command()
def down(home: Optional[Path] = HomeOpt,
         timeout: float = typer.Option(120.0, help="seconds to wait for a clean stop")) -> None:
    """Stop the background daemon (running databases are suspended first)."""
    h = _home(home)
    info = DaemonInfo.read(h)
    if info is None:
        raise CliError(f"no pgfleet daemon is running on {h}")
    os.kill(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    with err.status("stopping pgfleet (suspending databases)…"):
        while time.monotonic() < deadline:
            if not pid_alive(info.pid):
                err.print("pgfleet is down")
                return
            time.sleep(0.05)
    raise CliError(f"the daemon (pid {info.pid}) did not stop within {timeout:.0f}s")


@app.command()
def status(as_json: bool = JsonOpt) -> None:
    """Show the daemon and a count of databases by state."""
    data = _client().call("GET", "/v1/status")
    if as_json:
        _print_json(data)
        return
    out.print(f"pgfleet {data['version']} on {data['home']} ({data['driver']} driver)")
    out.print(f"proxy {data['listen']}   pooled {data['listen_pooled']}")
    if data.get("tls_ca_file"):
        out.print(f"TLS CA: {data['tls_ca_file']}   (sslmode=verify-full sslrootcert=<that file>; SNI NAME.{data['domain']})")
    states = ", ".join(f"{n} {s}" for s, n in sorted(data["states"].items())) or "none"
    out.print(f"databases: {data['databases']} ({states})")
    limits = data.get("host_limits") or []
    short = [c for c in limits if not c["ok"]]
    for c in short:
        out.print(f"[red]host limit too low:[/red] {c['name']}: {c['have']} available, {c['need']} needed "
                  f"for the configured fleet ({c['what']})", highlight=False)
    if limits and not short:
        tight = min(limits, key=lambda c: c["have"] / max(c["need"], 1))
        out.print(f"host limits: all hold the configured fleet (least headroom: {tight['name']}, "
                  f"{tight['have']} for {tight['need']})", highlight=False)
    standby, memory = data.get("standby"), data.get("memory")
    if standby:
        out.print(f"standby: {standby['explain']}; swap {standby['swap_bytes'] >> 20} MiB"
                  + ("" if standby["zswap"] is None else f", zswap {'on' if standby['zswap'] else 'off'}"))
    if memory:
        out.print(f"memory: {memory['charged_bytes'] >> 20} MiB charged of a {memory['budget_bytes'] >> 20} MiB budget"
                  + ("" if memory["pressure_some_avg10"] is None else f", pressure {memory['pressure_some_avg10']}%"))


@app.command()
def token() -> None:
    """Print the API token (created at the daemon's first start)."""
    h = _home(None)
    path = token_path(h)
    if not path.exists():
        ensure_token(h)
    sys.stdout.write(path.read_text())


# --- databases ---------------------------------------------------------------------
def _table(rows: list[dict]) -> Table:
    t = Table(box=None, header_style="bold")
    for c in ("NAME", "STATE", "MEMORY", "SCALE TO ZERO", "CLIENTS"):
        t.add_column(c, no_wrap=True)
    t.add_column("URI", overflow="fold")
    for r in rows:
        stz = r["scale_to_zero"]
        stz_text = f"{stz['policy']}, {stz['cooldown_ms'] / 1000:g}s" if stz["policy"] != "off" else "off"
        t.add_row(r["name"], _state_text(r["state"]), f"{r['memory_mb']} MiB", stz_text, str(r["clients"]), r["uri"])
    return t


def _state_text(state: str) -> str:
    colour = {"running": "green", "standby": "cyan", "stopped": "yellow", "deleting": "red"}.get(state, "magenta")
    return f"[{colour}]{state}[/{colour}]"


def _save_password(d: dict, password: Optional[str]) -> Path:
    entries = []
    for key in ("uri", "pooled_uri"):
        u = urlsplit(d[key])
        entries.append((u.hostname or "127.0.0.1", u.port or 5432, d["name"], d["role"]))
    return pgpass.save(entries, password)


@db_app.command("create")
def db_create(
    name: str,
    cooldown_ms: int = typer.Option(S.COOLDOWN_MS.default, help="scale to zero after this long without clients"),
    memory_mb: int = typer.Option(S.MEMORY_MB.default, help="memory limit"),
    policy: str = typer.Option(S.DEFAULT_POLICY, help="scale-to-zero policy: on, idle (idle sessions do not keep it up) or off"),
    cold_after_ms: int = typer.Option(S.COLD_AFTER_MS.default, help="warm standby this long, then cold"),
    require_tls: bool = typer.Option(False, "--require-tls", help="refuse plain-text connections"),
    pool_size: int = typer.Option(S.POOL_SIZE.default, help="server connections of the pooled listener"),
    max_pooled: int = typer.Option(S.MAX_POOLED_CLIENTS.default, help="client connections allowed on the pooled listener"),
    max_direct: int = typer.Option(S.MAX_DIRECT_CLIENTS.default, help="client connections allowed on the direct listener"),
    disk_mb: int = typer.Option(S.DISK_MB.default, help="disk limit in MiB, enforced (sandbox driver); 0: none"),
    cpu_pct: int = typer.Option(S.CPU_PCT.default, help="CPU cap in percent of one CPU (sandbox driver); 0: none"),
    save_password: bool = typer.Option(True, help="save the password in ~/.pgpass so `psql URI` works"),
    start: bool = typer.Option(True, "--start/--no-start",
                               help="start it now, or leave it in standby (the first connection wakes it)"),
    as_json: bool = JsonOpt,
) -> None:
    """Create a database; it is ready when this returns. The password is shown once."""
    d = _client().call("POST", "/v1/databases", {
        "name": name, "memory_mb": memory_mb,
        "scale_to_zero": {"policy": policy, "cooldown_ms": cooldown_ms, "cold_after_ms": cold_after_ms},
        "require_tls": require_tls, "autostart": start, "disk_mb": disk_mb, "cpu_pct": cpu_pct,
        "pooling": {"pool_size": pool_size, "max_pooled_clients": max_pooled, "max_direct_clients": max_direct},
    })
    _show_new_database(d, f"created [bold]{d['name']}[/bold] ({d['state']})", save_password, as_json)


def _show_new_database(d: dict, headline: str, save_password: bool, as_json: bool) -> None:
    """A database just made (create, branch): its password is shown this once (and saved)."""
    saved = _save_password(d, d["password"]) if save_password else None
    if as_json:
        _print_json(d)
        return
    out.print(headline)
    out.print(f"  uri        {d['uri']}")
    out.print(f"  pooled_uri {d['pooled_uri']}")
    out.print(f"  password   {d['password']}   [dim](shown once{'; saved in ' + str(saved) if saved else ''})[/dim]")


@db_app.command("set")
def db_set(
    name: str,
    memory_mb: Optional[int] = typer.Option(None, help="memory limit (applies at the next start)"),
    disk_mb: Optional[int] = typer.Option(None, help="disk limit in MiB (can only grow; applies at once)"),
    cpu_pct: Optional[int] = typer.Option(None, help="CPU cap in percent of one CPU, 0 for none (next start)"),
    as_json: bool = JsonOpt,
) -> None:
    """Change a database's limits."""
    body = {k: v for k, v in {"memory_mb": memory_mb, "disk_mb": disk_mb, "cpu_pct": cpu_pct}.items()
            if v is not None}
    d = _client().call("PATCH", f"/v1/databases/{name}", body)
    if as_json:
        _print_json(d)
        return
    out.print(f"{d['name']}: memory {d['memory_mb']} MiB, disk {d['disk_mb'] or 'no limit'}"
              f"{' MiB' if d['disk_mb'] else ''}")


LIST_STATES = ("starting", "running", "draining", "stopping", "standby", "stopped", "deleting")


@db_app.command("list")
def db_list(
    as_json: bool = JsonOpt,
    state: Optional[str] = typer.Option(None, help=f"only databases in this state: {', '.join(LIST_STATES)}"),
    limit: int = typer.Option(500, min=1, max=10_000, help="at most this many, by name"),
    cursor: Optional[str] = typer.Option(None, help="start after this name (the hint printed when more remain)"),
    all_pages: bool = typer.Option(False, "--all", help="every database, page by page"),
) -> None:
    """List databases by name, a page at a time."""
    from urllib.parse import urlencode

    if state is not None and state not in LIST_STATES:
        raise CliError(f"unknown state {state!r}: choose one of {', '.join(LIST_STATES)}")
    client, rows = _client(), []
    while True:
        query = {k: v for k, v in (("limit", limit), ("cursor", cursor), ("state", state)) if v is not None}
        page = client.call("GET", f"/v1/databases?{urlencode(query)}")
        rows += page["databases"]
        cursor = page.get("next_cursor")
        if cursor is None or not all_pages:
            break
    if cursor is not None:
        err.print(f"more databases follow: pgfleet db list --cursor {cursor} (or --all)", highlight=False)
    if as_json:
        _print_json(rows)
    elif not rows:
        err.print("no databases yet: create one with `pgfleet db create NAME`")
    else:
        out.print(_table(rows))


@db_app.command("show")
def db_show(name: str, as_json: bool = JsonOpt) -> None:
    """Show one database (with `backend` and `backend_user` while it runs)."""
    d = _client().call("GET", f"/v1/databases/{name}")
    if as_json:
        _print_json(d)
        return
    t = Table(box=None, show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in d.items():
        t.add_row(k, _state_text(v) if k == "state" else json.dumps(v) if isinstance(v, dict) else str(v))
    out.print(t)


def _action(verb: str, method: str, name: str, as_json: bool, done: str, body: dict | None = None) -> dict:
    d = _client().call(method, f"/v1/databases/{name}/{verb}", body)
    if as_json:
        _print_json(d)
    else:
        err.print(f"{name}: {done} ({d['state']})")
    return d


@db_app.command("suspend")
def db_suspend(name: str, as_json: bool = JsonOpt,
               tier: str = typer.Option("cold", help="cold: stopped, clients leave (up to 10 s); warm: frozen, "
                                                     "sessions kept (refused while one is busy)")) -> None:
    """Scale a database to zero now."""
    if tier not in ("warm", "cold"):
        raise CliError("--tier must be warm or cold")
    _action("suspend", "PUT", name, as_json, f"suspended, {tier}", {"tier": tier})


@db_app.command("resume")
def db_resume(name: str, as_json: bool = JsonOpt) -> None:
    """Start a database in standby or stopped."""
    _action("resume", "PUT", name, as_json, "resumed")


@db_app.command("stop")
def db_stop(name: str, as_json: bool = JsonOpt) -> None:
    """Stop a database: unlike standby, connections do not wake it."""
    _action("stop", "PUT", name, as_json, "stopped")


@db_app.command("delete")
def db_delete(name: str, as_json: bool = JsonOpt,
              yes: bool = typer.Option(True, "--yes/--confirm", help="ask before deleting"),
              purge: bool = typer.Option(False, "--purge", help="remove its backups too (else kept for their retention)")) -> None:
    """Delete a database and all its data (its backups stay for their retention unless --purge)."""
    if not yes and not typer.confirm(f"delete {name} and all its data?"):
        raise typer.Exit(1)
    client = _client()
    d = client.call("GET", f"/v1/databases/{name}")
    gone = client.call("DELETE", f"/v1/databases/{name}")
    if purge:
        gone["backups"] = client.call("DELETE", f"/v1/databases/{d['uuid']}/backups")["backups"]
    _save_password(d, None)
    if as_json:
        _print_json(gone)
    else:
        err.print(f"{name}: deleted")


@db_app.command("logs")
def db_logs(name: str, tail_bytes: int = typer.Option(65536, "--bytes", help="how much of the end of the log"),
            as_json: bool = JsonOpt) -> None:
    """Show the end of a database's log (Postgres' own, or the microVM console)."""
    d = _client().call("GET", f"/v1/databases/{name}/logs?tail_bytes={tail_bytes}")
    if as_json:
        _print_json(d)
    elif d["log"]:
        sys.stdout.write(d["log"] if d["log"].endswith("\n") else d["log"] + "\n")
    else:
        err.print(f"{name}: the log is empty")


@db_app.command("password")
def db_password(name: str, as_json: bool = JsonOpt,
                save_password: bool = typer.Option(True, help="update ~/.pgpass")) -> None:
    """Rotate a database's password (the new one is shown once)."""
    d = _client().call("POST", f"/v1/databases/{name}/password")
    if save_password:
        _save_password(d, d["password"])
    if as_json:
        _print_json(d)
    else:
        out.print(f"new password for {name}: {d['password']}   [dim](shown once)[/dim]")


from . import events as _events  # noqa: E402

_events.register(app, db_app, _client, JsonOpt)


def _mount_optional() -> None:
    """Sub-commands whose packages may be left out of a build: each mounts on its own."""
    import importlib

    for module, attr, name in (("pgfleet.cli.image", "image_app", "image"), ("pgfleet.k8s.cli", "k8s_app", "k8s")):
        try:
            sub = getattr(importlib.import_module(module), attr)
        except ImportError:
            continue
        app.add_typer(sub, name=name)


_mount_optional()
_register_branches(db_app, SimpleNamespace(client=_client, print_json=_print_json, show_new=_show_new_database,
                                           out=out, err=err, json_opt=JsonOpt))  # db branch, backups, restore


def main() -> None:
    try:
        code = app(standalone_mode=False, prog_name="pgfleet")
    except CliError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as exc:  # typer's public base of its (vendored) click errors
        sys.exit(_usage_failure(exc))
    sys.exit(code if isinstance(code, int) else 0)


def _usage_failure(exc: Exception) -> int:
    """Print a command-line error as one line (help for a bare group); its exit code.
    Typer exposes click's exceptions only through their public base, so tell them apart
    by what they offer, as typer's own error printer does."""
    if type(exc).__name__ == "NoArgsIsHelpError":
        exc.show()  # type: ignore[attr-defined]
        return 2
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    code = int(getattr(exc, "exit_code", 1))
    ctx = getattr(exc, "ctx", None)
    hint = f" (see `{ctx.command_path} --help`)" if code == 2 and ctx is not None else ""  # a usage error
    err.print(f"[red]error:[/red] {message}{hint}", highlight=False, soft_wrap=True, markup=bool(hint))
    return code


if __name__ == "__main__":
    main()
