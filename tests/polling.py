"""The one way tests wait for something: poll a condition until a deadline.

No sleep stands in for synchronisation: a test waits exactly as long as the condition
takes, and fails with what it last saw when the deadline passes. `until` is for async
tests, `wait_until` for blocking ones (subprocesses, HTTP); both treat an AssertionError
raised by the condition as "not yet"."""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Awaitable, Callable


def _probe(condition: Callable[[], Any]) -> Any:
    try:
        return condition()
    except AssertionError as exc:
        return _Failed(exc)


class _Failed:
    """A condition that raised AssertionError: false, but remembered for the message."""

    def __init__(self, exc: AssertionError) -> None:
        self.exc = exc

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"AssertionError({self.exc})"


def _timed_out(what: str, timeout: float, last: Any) -> AssertionError:
    return AssertionError(f"timed out after {timeout:g} s waiting for {what}; last: {last!r}")


async def until(condition: Callable[[], Any | Awaitable[Any]], timeout: float = 10.0,
                what: str = "condition", interval: float = 0.005) -> Any:
    """Await a truthy value of `condition()` (a plain or async callable); return it."""
    deadline = time.monotonic() + timeout
    while True:
        last = _probe(condition)
        if inspect.isawaitable(last):
            try:
                last = await last
            except AssertionError as exc:
                last = _Failed(exc)
        if last:
            return last
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, last)
        await asyncio.sleep(interval)


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.05) -> Any:
    """The blocking twin of `until`, for tests that drive subprocesses or HTTP."""
    deadline = time.monotonic() + timeout
    while True:
        last = _probe(condition)
        if last:
            return last
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, last)
        time.sleep(interval)
