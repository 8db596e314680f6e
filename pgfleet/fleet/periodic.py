"""One loop for the fleet's background chores (memory manager, backup schedule)."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

log = logging.getLogger(__name__)


async def run_every(interval_s: float, tick: Callable[[], Awaitable[object]], what: str) -> None:
    """`tick()` every `interval_s` until cancelled; a failing tick is logged, not fatal."""
    while True:
        try:
            await tick()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed", what)
        await asyncio.sleep(interval_s)


class Chore:
    """`tick()` every `interval_s` in the background, from start() until close()."""

    def __init__(self, interval_s: float, tick: Callable[[], Awaitable[object]], what: str) -> None:
        self.interval_s = interval_s
        self.tick = tick
        self.what = what
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(run_every(self.interval_s, self.tick, self.what))

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
