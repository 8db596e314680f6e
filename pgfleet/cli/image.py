"""`pgfleet image`: build and list microVM guest images (kernel + root fs + template data)."""

from __future__ import annotations

import json
import sys
import time

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pgfleet.drivers.base import DriverError

image_app = typer.Typer(help="Build and list microVM guest images.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)


@image_app.command("build")
def build(
    name: str = typer.Argument("postgres:15", help="image to build: postgres:<major>"),
    force: bool = typer.Option(False, "--force", help="rebuild even if cached"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Build the guest image (first time ~4 min: compiles a small kernel). Cached by content."""
    from pgfleet.drivers.microvm.image import build_image

    t0 = time.monotonic()
    try:
        if as_json or not sys.stderr.isatty():
            image = build_image(name, force=force,
                                progress=lambda stage, f, msg: None if as_json else
                                err.print(f"[{f * 100:5.1f}%] {stage}: {msg}"))
        else:
            with Progress(TextColumn("[bold]{task.fields[stage]:<7}"), BarColumn(),
                          TextColumn("{task.percentage:>5.1f}%"), TimeElapsedColumn(),
                          TextColumn("{task.description}"), console=err) as bar:
                task = bar.add_task("", total=1.0, stage="")

                def progress(stage: str, fraction: float, message: str) -> None:
                    bar.update(task, completed=fraction, description=message, stage=stage)

                image = build_image(name, force=force, progress=progress)
    except DriverError as exc:
        err.print(f"[red]image build failed:[/red] {exc}")
        raise typer.Exit(1)
    if as_json:
        print(json.dumps(image.to_json(), indent=2))
        return
    out.print(f"{image.name}: kernel {image.kernel_bytes / 1e6:.1f} MB, root fs "
              f"{image.rootfs_bytes / 1e6:.1f} MB ({image.rootfs_type}), "
              f"{image.postgres_version} — {time.monotonic() - t0:.1f} s")


@image_app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Images in the cache ($PGFLEET_CACHE, default /var/cache/pgfleet)."""
    from pgfleet.drivers.microvm.image import find_image, list_images

    images = list_images()
    current = {}
    for img in images:
        try:
            cur = find_image(img.name)
        except DriverError:
            cur = None
        current[img.name] = cur.key if cur else None
    rows = [{"name": i.name, "key": i.key, "kernel_bytes": i.kernel_bytes,
             "rootfs_bytes": i.rootfs_bytes, "built_at": i.built_at,
             "current": current.get(i.name) == i.key, "postgres": i.postgres_version}
            for i in images]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        out.print("no images yet: run `pgfleet image build`")
        return
    table = Table()
    for col in ("name", "key", "kernel", "rootfs", "built at", "current"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["key"], f"{r['kernel_bytes'] / 1e6:.1f} MB",
                      f"{r['rootfs_bytes'] / 1e6:.1f} MB",
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(r["built_at"])),
                      "yes" if r["current"] else "stale")
    out.print(table)


@image_app.command("prune")
def prune(
    dry_run: bool = typer.Option(False, "--dry-run", help="only show what would be removed"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Remove outdated images nothing uses any more, their templates and unused kernels.

    An image a suspended or running database was made from is kept: its snapshot can only
    resume on that image.
    """
    from pgfleet.drivers.microvm.image import prune_images

    removed = prune_images(dry_run=dry_run)
    if as_json:
        print(json.dumps([str(p) for p in removed], indent=2))
        return
    verb = "would remove" if dry_run else "removed"
    for path in removed:
        out.print(f"{verb} {path}")
    if not removed:
        out.print("nothing to prune")
