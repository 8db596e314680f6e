"""The sandbox driver after a daemon restart: which instances still have a postmaster (one scan
of the host), adopting the ready ones and stopping the rest in the background, and removing
what a create cut short left behind. A mixin of SandboxDriver.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from ..base import Backend, InstanceSpec
from .procscan import find_postmaster, find_postmasters
from ..spawn import wait_pid_exit
from .processes import QUIT_TIMEOUT_S, _is_ready
from .storage import mounted_data_dirs

log = logging.getLogger(__name__)


class SandboxRecovery:
    """Methods of SandboxDriver; see Driver for what each promises."""

    async def remove_orphan(self, home: Path) -> None:
        if self.storage is None or not self.storage.is_overlay(home):
            return  # not a provision() of ours
        if find_postmaster(home / "data") is not None:
            log.error("%s has no database recorded but a live postgres: left alone", home)
            return
        log.warning("removing %s: a create cut short (no database was recorded for it)", home)
        self.storage.destroy(home)

    async def recover_scan(self, specs: list[InstanceSpec]) -> set[str] | None:
        self._scanned = await asyncio.to_thread(find_postmasters)
        real = {p: os.path.realpath(p) for p in {s.home.parent for s in specs}}  # one per instances dir
        by_dir = {os.path.join(real[s.home.parent], s.home.name, self.data_dir(s).name): s for s in specs}
        alive = {by_dir[d].uuid for d in self._scanned if d in by_dir}
        # data directories a crash left mounted with no Postgres on them: unmount (one
        # pass over the mount table, not one look per database)
        for parent in real:
            for data in mounted_data_dirs(parent):
                spec = by_dir.get(str(data))
                if spec is not None and spec.uuid not in alive and self.storage is not None:
                    self.storage.unmount(spec.home)
        return alive

    def recover_done(self) -> None:
        self._scanned = None

    def _postmaster_of(self, spec: InstanceSpec) -> int | None:
        if self._scanned is not None:
            return self._scanned.get(os.path.realpath(self.data_dir(spec)))
        return find_postmaster(self.data_dir(spec))

    async def recover(self, spec: InstanceSpec) -> Backend | None:
        pm = self._postmaster_of(spec)
        if pm is None:
            self._cgroup(spec).remove()
            self._freezer(spec).remove()
            return None
        if _is_ready(self.data_dir(spec)):
            return await self._adopt_or_stop(spec, pm, keep=True)
        # Alive but not ready (or its lock file is not one: the tenant controls it): stop it
        # in the background, so that one tenant never holds up the daemon's start. A start
        # of this instance in the meantime waits for that stop (same waiter).
        if spec.uuid not in self._running:
            self._watch(spec, pm, wait_pid_exit(pm))
        # immediate shutdown: it was not serving, and WAL recovery makes the next start whole
        task = asyncio.create_task(self._shutdown(spec, signal.SIGQUIT, QUIT_TIMEOUT_S))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)
        return None

