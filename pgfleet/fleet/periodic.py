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
