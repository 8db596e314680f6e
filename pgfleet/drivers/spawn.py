"""Starting a child process on a wake's critical path, cheaply, whatever the event loop.

asyncio's subprocesses under uvloop go through libuv, which fork()s the daemon: page tables
and all (milliseconds for a daemon of ~100 MB, on the event loop's thread, every wake).
CPython's subprocess uses vfork when no Python code runs between fork and exec, so a wake
spawns here with `subprocess.Popen` and waits for the exit on a pidfd (no child watcher, no
thread, no polling). Only this object reaps the child.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from typing import IO


class Spawned:
    """A child process: `pid`, `returncode` (None while it runs), `kill()`, `await wait()`."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._exited: asyncio.Future[None] | None = None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def kill(self) -> None:
        if self._popen.poll() is None:
            self._popen.kill()

    async def wait(self) -> int:
        if self._popen.poll() is not None:
            return self._popen.returncode
        await wait_pid_exit(self.pid)  # our unreaped child: the pid cannot have been reused
        return self._popen.wait()


def spawn(argv: list[str], *, stdout: IO | int | None = None, stderr: IO | int | None = None) -> Spawned:
    """`argv` in a new session, stdin from /dev/null, descriptors closed (vfork: ~1 ms)."""
    return Spawned(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                    start_new_session=True, close_fds=True))


async def wait_pid_exit(pid: int) -> None:
    """Wait until process `pid` has exited, on a pidfd (no polling, no thread). For a process
    that is not our child (a postmaster adopted after a restart) the pidfd also rules out a
    reused pid; one already gone returns at once."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
