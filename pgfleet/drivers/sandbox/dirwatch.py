"""Waiting for a file in a directory to change, without polling: inotify (Linux), by ctypes.

A wake waits for postmaster.pid to say "ready"; polling it every millisecond adds about a
millisecond to every wake (the event loop's timer granularity) and costs CPU during a storm.
The directory is the tenant's: events are only a hint to look again (never trusted), their
number is bounded per read, and without inotify (or over the watch limit) it falls back to
a short poll.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
from pathlib import Path

_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_IN_MODIFY = 0x002
_IN_CLOSE_WRITE = 0x008
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_MASK = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
_READ_BYTES = 4096  # events are drained, never parsed: any event means "look again"
FALLBACK_POLL_S = 0.001

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class DirWatch:
    """`await changed(timeout)` returns after something in `directory` changed (or the
    timeout passed). Use as a context manager; start it before the change can happen."""

    def __init__(self, directory: Path) -> None:
        self.fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self.fd >= 0 and _libc.inotify_add_watch(self.fd, os.fsencode(directory), _MASK) < 0:
            os.close(self.fd)
            self.fd = -1
        self._ready: asyncio.Event | None = None

    def __enter__(self) -> DirWatch:
        if self.fd >= 0:
            self._ready = asyncio.Event()
            asyncio.get_running_loop().add_reader(self.fd, self._on_readable)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self.fd)
            # Closing an inotify instance waits for an SRCU grace period (10-20 ms measured):
            # on a worker thread, not on the wake's critical path.
            loop.run_in_executor(None, os.close, self.fd)
            self.fd = -1

    def _on_readable(self) -> None:
        try:
            while os.read(self.fd, _READ_BYTES):
                pass
        except BlockingIOError:
            pass
        assert self._ready is not None
        self._ready.set()

    async def changed(self, timeout_s: float) -> None:
        if self._ready is None:  # no inotify here: a short poll
            await asyncio.sleep(FALLBACK_POLL_S)
            return
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        self._ready.clear()
