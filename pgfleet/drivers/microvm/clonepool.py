"""The clone pool: template copies made ahead of time.

Copying a template's RAM file (and writing its disk's copy-on-write overlay) costs 30-60 ms
of a clone's latency. A few copies
are made ahead of time, in the background, under state_dir/clone-pool; a create claims one
with a directory rename (atomic: two creates never get the same copy) and moves its files
into the instance home, which is only renames when both are on one filesystem. Otherwise
the pool is not used.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from . import qcow2, vmm
from .snapshot import copy_sparse, mark_unsynced, snapshot_usable

log = logging.getLogger("pgfleet.drivers.microvm")


@dataclass(frozen=True)
class Template:
    dir: Path
    memory_mb: int
    vcpus: int

    @property
    def files(self) -> vmm.VmFiles:
        return vmm.VmFiles(self.dir)


def log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("microvm background work failed: %s", task.exception())


def copy_template(src: vmm.VmFiles, dst: vmm.VmFiles) -> None:
    copy_sparse(src.ram, dst.ram)
    # The disk is not copied: an empty overlay reads through to the template's image, which
    # stays where it is, unchanged, while any database refers to it (templates.py).
    qcow2.write_overlay(dst.data_cow, src.data, os.stat(src.data).st_size)
    vmm.record_backing(dst, src.data)  # what QEMU reads through to: never the overlay's header
    # The guest's boot and Postgres startup lines, so log_path() tells the whole story.
    with open(src.console, "rb") as fin, open(dst.console, "ab") as fout:
        shutil.copyfileobj(fin, fout)
        fout.write(b"--- pgfleet: restored from template snapshot ---\n")
    shutil.copyfile(src.state, dst.state_tmp)
    mark_unsynced(dst.state)
    os.rename(dst.state_tmp, dst.state)  # the state goes last: it vouches for the others


class ClonePool:
    def __init__(self, root: Path, size: int, current: Callable[[], Iterable[Template]]) -> None:
        self.root = root
        #: copies kept ready per template (0: copy on create)
        self.size = size
        self._current = current  # the templates in use: copies of others are removed
        self._fills: dict[str, asyncio.Future] = {}

    def dir(self, tpl: Template) -> Path:
        return self.root / tpl.dir.name

    def take(self, tpl: Template, dst: vmm.VmFiles) -> bool:
        """Move a ready copy of `tpl` into dst (True), or find none usable (False)."""
        pool = self.dir(tpl)
        try:
            if os.stat(pool).st_dev != os.stat(dst.home).st_dev:
                return False
            ready = sorted(p for p in pool.iterdir() if p.name.startswith("ready-"))
        except FileNotFoundError:
            return False
        for slot in ready:
            claimed = dst.home / ".pool-claim"
            try:
                os.rename(slot, claimed)
            except OSError:
                continue  # another create took it first
            src = vmm.VmFiles(claimed)
            if not snapshot_usable(src.state) or (  # copied before a host crash: maybe torn
                    # or an overlay made before its template image was recorded
                    vmm.disk_format(src.disk) == "qcow2" and not src.backing.exists()):
                shutil.rmtree(claimed, ignore_errors=True)
                continue
            os.rename(src.ram, dst.ram)
            if vmm.disk_format(src.disk) == "qcow2":
                os.rename(src.backing, dst.backing)
            os.rename(src.disk, dst.home / src.disk.name)  # (raw in copies made by older versions)
            os.rename(src.console, dst.console)
            mark_unsynced(dst.state)
            os.rename(src.state, dst.state)  # the state goes last: it vouches for the others
            shutil.rmtree(claimed, ignore_errors=True)
            return True
        return False

    def refill(self, tpl: Template) -> None:
        """Top the pool up to `size` copies in the background (one filler per template)."""
        if self.size <= 0:
            return
        running = self._fills.get(tpl.dir.name)
        if running is not None and not running.done():
            return
        fill = asyncio.ensure_future(asyncio.to_thread(self._fill, tpl))
        fill.add_done_callback(log_failure)
        self._fills[tpl.dir.name] = fill

    def _fill(self, tpl: Template) -> None:
        pool = self.dir(tpl)
        pool.mkdir(parents=True, exist_ok=True)
        os.chmod(pool, 0o700)
        current = {t.dir.name for t in self._current()}
        for old in pool.parent.iterdir():  # copies of templates that are no longer current
            if old != pool and old.name not in current:
                shutil.rmtree(old, ignore_errors=True)
        while sum(1 for p in pool.iterdir() if p.name.startswith("ready-")) < self.size:
            tmp = pool / f"fill-{os.getpid()}-{os.urandom(4).hex()}"
            tmp.mkdir()
            try:
                copy_template(tpl.files, vmm.VmFiles(tmp))
                os.rename(tmp, pool / f"ready-{time.time_ns()}-{os.urandom(2).hex()}")
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

    async def close(self) -> None:
        """Wait for fillers still copying (a thread cannot be interrupted)."""
        for fill in list(self._fills.values()):
            try:
                await fill
            except OSError:
                pass  # logged by its done callback
