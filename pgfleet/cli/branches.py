"""`pgfleet db branch | backups | backup | restore`: branches and point-in-time restore."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from .client import CliError


def register(db_app: typer.Typer, ui) -> None:
    """Add the commands to `db_app`; `ui` carries the CLI's helpers (client, print_json,
    show_new, out, err, json_opt), passed in so that this module never imports main."""
    _client, _print_json, out, err = ui.client, ui.print_json, ui.out, ui.err
    JsonOpt = ui.json_opt


    @db_app.command("branch")
    def db_branch(
        parent: str, name: str,
        at: Optional[str] = typer.Option(None, "--at", help="a moment of PARENT's restore window (ISO 8601, UTC if no zone)"),
        lsn: Optional[str] = typer.Option(None, "--lsn", help="a WAL position of PARENT, e.g. 0/16B3748"),
        save_password: bool = typer.Option(True, help="save the password in ~/.pgpass"),
        as_json: bool = JsonOpt,
    ) -> None:
        """Make NAME, a new database holding PARENT's data as of now (or --at / --lsn), with its own password."""
        if at is not None and lsn is not None:
            raise CliError("give --at or --lsn, not both")
        body = {"name": name, **({"at": at} if at else {}), **({"lsn": lsn} if lsn else {})}
        d = _client().call("POST", f"/v1/databases/{parent}/branches", body)
        point = f" at {at or lsn}" if (at or lsn) else ""
        ui.show_new(d, f"branched [bold]{d['name']}[/bold] from {parent}{point} ({d['state']})", save_password, as_json)


    @db_app.command("backups")
    def db_backups(
        name: str,
        retention: Optional[float] = typer.Option(None, "--retention", help="set how many days of backups to keep"),
        as_json: bool = JsonOpt,
    ) -> None:
        """Show a database's restore window and base backups (a deleted database's too)."""
        client = _client()
        if retention is not None:
            d = client.call("PATCH", f"/v1/databases/{name}/backups", {"retention_days": retention})
        else:
            d = client.call("GET", f"/v1/databases/{name}/backups")
        if as_json:
            _print_json(d)
            return
        window = d["window"]
        state = f" (deleted {d['deleted_at']})" if d["deleted"] else ""
        out.print(f"{d['name']}{state}: restore window {window['from'] or '(empty: no base backup yet)'}"
                  f"{' to ' + window['to'] if window['from'] else ''}, retention {d['retention_s'] / 86400:g} days")
        t = Table(box=None, header_style="bold")
        for c in ("BASE BACKUP", "CONSISTENT AT", "TIMELINE"):
            t.add_column(c, no_wrap=True)
        for b in d["base_backups"]:
            t.add_row(b["label"], b["consistent_at"], str(b["timeline"]))
        out.print(t)
        out.print(f"archived WAL: {d['wal_files']} files, {d['wal_bytes'] / 1048576:.1f} MiB")


    @db_app.command("backup")
    def db_backup(name: str, as_json: bool = JsonOpt) -> None:
        """Take a base backup now (they are also taken daily)."""
        d = _client().call("POST", f"/v1/databases/{name}/backups")
        if as_json:
            _print_json(d)
        else:
            err.print(f"{name}: base backup {d['base_backups'][-1]['label']} taken")


    @db_app.command("restore")
    def db_restore(
        name: str,
        at: str = typer.Option(..., "--at", help="a moment of the restore window (ISO 8601, UTC if no zone)"),
        as_json: bool = JsonOpt,
    ) -> None:
        """Restore NAME in place to --at; the state it replaces is kept as a branch NAME-before-<time>."""
        d = _client().call("POST", f"/v1/databases/{name}/restore", {"at": at})
        if as_json:
            _print_json(d)
        else:
            err.print(f"{name}: restored to {at}; the state it replaced is kept as {d['kept']['name']} ({d['kept']['state']})")
