"""`pgfleet`: the command line. Human output is a table; `--json` is for scripts.
Every failure is one line on stderr and a non-zero exit."""

from __future__ import annotations

import dataclasses
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


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context, home: Optional[Path] = HomeOpt,
          version: bool = typer.Option(False, "--version", help="print the version and exit")) -> None:
    if version:
        sys.stdout.write(f"pgfleet {__version__}\n")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        sys.stdout.write(ctx.get_help() + "\n")
        raise typer.Exit(2)
    if home is not None:
        use_home(home)


# --- daemon -----------------------------------------------------------------------
@app.command()
def up(
    home: Optional[Path] = HomeOpt,
    config: Optional[Path] = typer.Option(None, "--config", help="settings file (TOML; default: <home>/config.toml, "
                                          "written by every start)"),
    listen: Optional[str] = typer.Option(None, help=f"proxy listener, one server session per client [{DEFAULT_LISTEN}]"),
    listen_pooled: Optional[str] = typer.Option(None, help=f"pooled listener [{DEFAULT_LISTEN_POOLED}]"),
    api: Optional[str] = typer.Option(None, help=f"REST API listener [{DEFAULT_API}]"),
    listen_http: Optional[str] = typer.Option(None, help="SQL over HTTP and WebSocket (Neon's serverless "
                                              f"driver protocol), or 'off' [{DEFAULT_LISTEN_HTTP}]"),
    http_max_request_mb: Optional[int] = typer.Option(None, help="largest POST /sql body or WebSocket message, MiB [10]"),
    http_max_response_mb: Optional[int] = typer.Option(None, help="largest answer to one POST /sql, MiB [10]"),
    http_tls: Optional[str] = typer.Option(None, help="TLS on --listen-http: on, off, or auto (off on loopback only) [auto]"),
    ws_session: Optional[str] = typer.Option(None, help="WebSocket sessions on paths other than /direct, /pooled: "
                                             "direct or pooled [direct]"),
    driver: Optional[str] = typer.Option(None, help="isolation driver: auto, sandbox or microvm [auto]"),
    tls_cert: Optional[Path] = typer.Option(None, help="TLS certificate (PEM) for the proxies"),
    tls_key: Optional[Path] = typer.Option(None, help="TLS private key (PEM)"),
    tls: Optional[bool] = typer.Option(None, "--tls/--no-tls",
                                       help="without --tls-cert: make a local CA and certificate on first start [tls]"),
    domain: Optional[str] = typer.Option(None, help="SNI routing: database NAME answers at NAME.<domain> [db.localhost]"),
    log_format: Optional[str] = typer.Option(None, help="daemon.log lines: text or json [text]"),
    detach: bool = typer.Option(False, "--detach", "-d", help="run in the background; return once it serves"),
    timeout: float = typer.Option(120.0, help="with --detach: seconds to wait for the daemon"),
    swap: Optional[str] = typer.Option(None, help="make and enable a swap file of this size (and zswap) for "
                                                  "warm standby, e.g. 4G; removed at stop"),
    memory_budget: Optional[str] = typer.Option(None, help="memory the databases may use, e.g. 16G "
                                                           "(default: 75% of RAM); beyond it idle ones are demoted"),
    cow_image: Optional[str] = typer.Option(None, help="branches by copy-on-write (reflink) on a host whose home is "
                                                       "not on XFS/btrfs: make a sparse XFS image of this size, "
                                                       "e.g. 20G, for the databases' files (kept; mounted at "
                                                       "every start)"),
    as_json: bool = JsonOpt,
) -> None:
    """Run the pgfleet daemon (foreground; Ctrl-C suspends databases and stops cleanly).

    Settings not given as flags come from --config FILE, else from <home>/config.toml, which
    every start writes with the listeners it serves on."""
    from pgfleet import daemon_config
    from pgfleet.drivers import DRIVER_NAMES

    h = _home(home)
    try:
        v = daemon_config.resolve(h, config, {
            "listen": listen, "listen_pooled": listen_pooled, "api": api, "driver": driver, "domain": domain,
            "tls": tls, "log_format": log_format, "listen_http": listen_http, "http_tls": http_tls,
            "http_max_request_mb": http_max_request_mb, "http_max_response_mb": http_max_response_mb,
            "ws_session": ws_session,
            "tls_cert": str(tls_cert.absolute()) if tls_cert else None,
            "tls_key": str(tls_key.absolute()) if tls_key else None,
        })
    except daemon_config.ConfigError as exc:
        raise CliError(str(exc)) from None
    if v["driver"] not in DRIVER_NAMES:
        raise CliError(f"unknown driver {v['driver']!r}: choose one of {', '.join(DRIVER_NAMES)}")
    if v["log_format"] not in ("text", "json"):
        raise CliError(f"unknown log format {v['log_format']!r}: choose text or json")
    if v["http_tls"] not in ("auto", "on", "off"):
        raise CliError(f"--http-tls must be auto, on or off, not {v['http_tls']!r}")
    if v["ws_session"] not in ("direct", "pooled"):
        raise CliError(f"--ws-session must be direct or pooled, not {v['ws_session']!r}")
    if v["http_max_request_mb"] < 1 or v["http_max_response_mb"] < 1:
        raise CliError("--http-max-request-mb and --http-max-response-mb must be at least 1")
    http_on = v["listen_http"].lower() != "off"
    running = DaemonInfo.read(h)
    if running is not None:
        raise CliError(f"a pgfleet daemon (pid {running.pid}) is already running on {h}")
    if bool(v["tls_cert"]) != bool(v["tls_key"]):
        raise CliError("--tls-cert and --tls-key go together")
    for f in (v["tls_cert"], v["tls_key"]):
        if f is not None and not Path(f).is_file():
            raise CliError(f"no such file: {f}")
    listeners = {"--listen": v["listen"], "--listen-pooled": v["listen_pooled"], "--api": v["api"]}
    if http_on:
        listeners["--listen-http"] = v["listen_http"]
    try:
        daemon_config.check_free(listeners)
    except (daemon_config.ConfigError, ValueError) as exc:
        raise CliError(str(exc)) from None
    from pgfleet.drivers.swap import parse_size

    sizes: dict[str, int | None] = {}
    for flag, value in (("--swap", swap), ("--memory-budget", memory_budget), ("--cow-image", cow_image)):
        try:
            sizes[flag] = parse_size(value) if value is not None else None
        except ValueError as exc:
            raise CliError(f"{flag}: {exc}") from None
    # not remembered in the config: they change the host (a swap file), given each time
    extra = [f"{flag}={value}" for flag, value in
             (("--swap", swap), ("--memory-budget", memory_budget), ("--cow-image", cow_image)) if value]
    if detach:
        info = _detach(h, v, timeout, quiet=as_json, extra=extra)
        if as_json:
            _print_json(dataclasses.asdict(info))
        return
    from pgfleet.daemon import AlreadyRunning, DaemonOptions, LimitsError, ListenError, run
    from pgfleet.drivers.cowstore import CowStoreError
    from pgfleet.edge.settings import MiB, EdgeSettings

    http = EdgeSettings(max_request_bytes=v["http_max_request_mb"] * MiB,
                        max_response_bytes=v["http_max_response_mb"] * MiB,
                        ws_session=v["ws_session"])  # type: ignore[arg-type]
    try:
        run(DaemonOptions(home=h, listen=v["listen"], listen_pooled=v["listen_pooled"], api=v["api"],
                          driver=v["driver"], tls_cert=Path(v["tls_cert"]) if v["tls_cert"] else None,
                          tls_key=Path(v["tls_key"]) if v["tls_key"] else None, tls=v["tls"], domain=v["domain"],
                          log_format=v["log_format"], listen_http=v["listen_http"] if http_on else None,
                          http=http, http_tls=v["http_tls"],
                          swap_bytes=sizes["--swap"], memory_budget_bytes=sizes["--memory-budget"],
                          cow_image_bytes=sizes["--cow-image"]))
    except (AlreadyRunning, LimitsError, ListenError, CowStoreError) as exc:
        raise CliError(str(exc)) from None


def _detach(home: Path, v: dict, timeout: float, quiet: bool, extra: list[str]) -> DaemonInfo:
    """Start `pgfleet up` in the background with exactly these settings (as flags)."""
    home.mkdir(parents=True, exist_ok=True)
    logf = open(home / "daemon.out", "ab")
    cmd = [sys.executable, "-m", "pgfleet.cli.main", "up", "--home", str(home), "--listen", v["listen"],
           "--listen-pooled", v["listen_pooled"], "--api", v["api"], "--driver", v["driver"],
           f"--domain={v['domain']}", "--tls" if v["tls"] else "--no-tls", f"--log-format={v['log_format']}",
           f"--listen-http={v['listen_http']}", f"--http-tls={v['http_tls']}", f"--ws-session={v['ws_session']}",
           f"--http-max-request-mb={v['http_max_request_mb']}", f"--http-max-response-mb={v['http_max_response_mb']}"]
    if v["tls_cert"] and v["tls_key"]:
        cmd += [f"--tls-cert={v['tls_cert']}", f"--tls-key={v['tls_key']}"]
    cmd += extra
    start_at = (home / "daemon.out").stat().st_size
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
    deadline = time.monotonic() + timeout
    with err.status("starting the pgfleet daemon…"):
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                with open(home / "daemon.out", "rb") as f:
                    f.seek(start_at)
                    tail = f.read().decode(errors="replace").strip().splitlines()[-1:]
                last = " ".join(tail).removeprefix("error: ")
                raise CliError(f"the daemon exited during start: {last or 'see ' + str(home / 'daemon.log')}")
            info = DaemonInfo.read(home)
            if info is not None and info.pid == proc.pid:
                if not quiet:
                    err.print(f"pgfleet is up (pid {info.pid}): proxy {info.listen}, API {info.api_url}")
                return info
            time.sleep(0.05)
    proc.terminate()
    raise CliError(f"the daemon did not come up within {timeout:.0f}s (see {home / 'daemon.log'})")


@app.command()
def down(home: Optional[Path] = HomeOpt,
         timeout: float = typer.Option(120.0, help="seconds to wait for a clean stop"),
         as_json: bool = JsonOpt) -> None:
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
                if as_json:
                    _print_json({"stopped": True, "pid": info.pid, "home": str(h)})
                else:
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
        out.print(f"TLS CA: {data['tls_ca_file']}", soft_wrap=True, highlight=False)
        out.print(f"verified TLS, routed by SNI (NAME.{data['domain']} needs no DNS entry with hostaddr):",
                  soft_wrap=True, highlight=False)
        out.print(f"  {tls_hint(data['listen'], data['domain'], data['tls_ca_file'])}", soft_wrap=True,
                  highlight=False, markup=False)
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
                  + ("" if memory["pressure_full_avg10"] is None else f", pressure {memory['pressure_full_avg10']}%"))
    branching = data.get("branch_storage")
    if branching:
        out.print(f"branches: {'copy-on-write (reflink)' if branching['mode'] == 'reflink' else 'full copies'} "
                  f"in {branching['path']}" + (f" (image {branching['image']})" if branching["image"] else ""),
                  highlight=False)


def tls_hint(listen: str, domain: str, ca_file: str, name: str = "NAME") -> str:
    """A psql command that works as printed: libpq sends host= as SNI and checks the certificate
    against it, while hostaddr= says where to connect (NAME.db.localhost needs no resolver)."""
    host, _, port = listen.rpartition(":")
    return (f'psql "host={name}.{domain} hostaddr={host.strip("[]")} port={port} user={name} dbname={name} '
            f'sslmode=verify-full sslrootcert={ca_file}"')


@app.command()
def token(as_json: bool = JsonOpt) -> None:
    """Print the API token (created at the daemon's first start)."""
    h = _home(None)
    path = token_path(h)
    if not path.exists():
        ensure_token(h)
    if as_json:
        _print_json({"token": path.read_text().strip(), "path": str(path)})
    else:
        sys.stdout.write(path.read_text())


# --- databases ---------------------------------------------------------------------
def _table(rows: list[dict]) -> Table:
    t = Table(box=None, header_style="bold")
    for c in ("NAME", "STATE", "MEMORY", "SCALE TO ZERO", "CLIENTS"):
        t.add_column(c, no_wrap=True)
    t.add_column("URI", no_wrap=True, overflow="ignore")  # a URI is copied whole, never split
    for r in rows:
        stz = r["scale_to_zero"]
        stz_text = f"{stz['policy']}, {stz['cooldown_ms'] / 1000:g}s" if stz["policy"] != "off" else "off"
        t.add_row(r["name"], _state_text(r["state"]), f"{r['memory_mb']} MiB", stz_text, str(r["clients"]), r["uri"])
    return t


def _print_table(table: Table) -> None:
    """On a terminal, rich's table; piped, as wide as its longest line (no wrapping at 80)."""
    if out.is_terminal:
        out.print(table)
    else:
        Console(width=100_000, no_color=True).print(table, crop=False)


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
        _print_table(_table(rows))


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
              yes: bool = typer.Option(False, "--yes", "-y", help="do not ask (on a terminal it asks first)"),
              purge: bool = typer.Option(False, "--purge", help="remove its backups too (else kept for their retention)")) -> None:
    """Delete a database and all its data (its backups stay for their retention unless --purge)."""
    client = _client()
    d = client.call("GET", f"/v1/databases/{name}")
    if not yes and sys.stdin.isatty():
        if not typer.confirm(f"delete {name} and all its data?", default=False, err=True):
            raise CliError(f"{name}: not deleted")
    gone = client.call("DELETE", f"/v1/databases/{name}")
    if purge:
        gone["backups"] = client.call("DELETE", f"/v1/databases/{d['uuid']}/backups")["backups"]
    _save_password(d, None)
    if as_json:
        _print_json(gone)
    else:
        err.print(f"{name}: deleted")


@db_app.command("uri")
def db_uri(name: str, pooled: bool = typer.Option(False, "--pooled", help="the pooled listener's URI"),
           as_json: bool = JsonOpt) -> None:
    """Print a database's connection URI (its password is in ~/.pgpass since create)."""
    d = _client().call("GET", f"/v1/databases/{name}")
    if as_json:
        _print_json({"name": d["name"], "uri": d["uri"], "pooled_uri": d["pooled_uri"]})
    else:
        sys.stdout.write((d["pooled_uri"] if pooled else d["uri"]) + "\n")


@db_app.command("update")
def db_update(
    name: str,
    memory_mb: Optional[int] = typer.Option(None, help="memory limit (applies from the next start)"),
    cooldown_ms: Optional[int] = typer.Option(None, help="scale to zero after this long without clients"),
    policy: Optional[str] = typer.Option(None, help="scale-to-zero policy: on, idle (microvm) or off"),
    as_json: bool = JsonOpt,
) -> None:
    """Change a database's settings."""
    client = _client()
    body: dict[str, Any] = {}
    if memory_mb is not None:
        body["memory_mb"] = memory_mb
    if cooldown_ms is not None or policy is not None:
        current = client.call("GET", f"/v1/databases/{name}")["scale_to_zero"]
        body["scale_to_zero"] = {"policy": policy if policy is not None else current["policy"],
                                 "cooldown_ms": cooldown_ms if cooldown_ms is not None else current["cooldown_ms"]}
    if not body:
        raise CliError("nothing to change: give --memory-mb, --cooldown-ms or --policy")
    d = client.call("PATCH", f"/v1/databases/{name}", body)
    if as_json:
        _print_json(d)
    else:
        stz = d["scale_to_zero"]
        err.print(f"{name}: memory {d['memory_mb']} MiB, scale to zero {stz['policy']} after {stz['cooldown_ms']} ms")


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
