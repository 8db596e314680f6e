"""A postgres loaded once and forked for each sandboxed start (zygote.c): a wake skips the exec
of postgres and its dynamic linking (~9 ms of a ~31 ms start), not any step of the jail.

The zygote is the daemon's child (killed with it); each process it forks for a start is the
zygote's child, which the daemon watches through the pidfd the zygote hands over. Should the
zygote be missing or die, `spawn` returns None and the caller execs the jail as before; the
next start makes a new zygote.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import select
import signal
import socket
import subprocess
from pathlib import Path


log = logging.getLogger(__name__)

ARGV_AREA_BYTES = 16384  # a postgres command line is ~1-2 KiB
REPLY_TIMEOUT_S = 5.0  # a fork: far less; past it the zygote is taken for dead


class ZygoteProcess:
    """A start forked by the zygote, as Spawned has it: `pid`, `returncode` (None while it
    runs; its status is the zygote's to reap, so -1 once it has exited), `kill()`, `await wait()`."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self._pidfd = pidfd

    @property
    def returncode(self) -> int | None:
        if self._pidfd < 0:
            return -1
        return -1 if _readable(self._pidfd, 0) else None

    def kill(self) -> None:
        if self.returncode is None:
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    async def wait(self) -> int:
        if self._pidfd >= 0:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self._pidfd, lambda: done.done() or done.set_result(None))
            try:
                await done
            finally:
                loop.remove_reader(self._pidfd)
                os.close(self._pidfd)
                self._pidfd = -1
        return -1


class Zygote:
    """One zygote per driver: `postgres` with zygote.so preloaded, serving `spawn`."""

    def __init__(self, postgres: Path, library: Path) -> None:
        self.postgres = postgres
        self.library = library
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None

    def start(self) -> None:
        """(Re)start the zygote: at prepare, so that no wake waits for postgres' exec."""
        self.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                # room in its argv area for each start's arguments and process titles (zygote.c)
                [str(self.postgres), " " * ARGV_AREA_BYTES], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, pass_fds=(theirs.fileno(),), cwd="/", start_new_session=True,
                env={"LD_PRELOAD": str(self.library), "PGFLEET_ZYGOTE_FD": str(theirs.fileno())},
            )
        finally:
            theirs.close()
        self._sock = ours

    def spawn(self, jail_args: list[str], log_fd: int) -> ZygoteProcess | None:
        """Fork a start: `jail_args` are pgfleet-jail's arguments (jail_argv without the
        program), its stdout and stderr `log_fd`. None if the zygote cannot (the caller execs):
        then nothing was started, as a forked start waits for the zygote's go, which comes only
        after its pid reached us (zygote.c), so the request may be sent again or exec'd."""
        for attempt in range(2):  # a zygote found dead is replaced once
            if self._sock is None or (self._proc is not None and self._proc.poll() is not None):
                try:
                    self.start()
                except OSError as exc:
                    log.warning("cannot start the postgres zygote: %s", exc)
                    return None
            assert self._sock is not None
            request = b"".join(a.encode() + b"\0" for a in jail_args)
            try:
                self._sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [log_fd]))])
                if not _readable(self._sock.fileno(), REPLY_TIMEOUT_S):
                    raise OSError("no answer")
                data, fds, _, _ = socket.recv_fds(self._sock, 4, 1, socket.MSG_CMSG_CLOEXEC)
            except OSError as exc:
                log.warning("the postgres zygote failed (%s); starting a new one", exc)
                self.close(kill=True)
                continue
            pid = int.from_bytes(data, "little", signed=True) if len(data) == 4 else -1
            if pid <= 0 or not fds:
                for fd in fds:
                    os.close(fd)
                if not data:  # closed: it died
                    self.close(kill=True)
                    continue
                return None
            return ZygoteProcess(pid, fds[0])
        return None

    def close(self, kill: bool = False) -> None:
        """Stop the zygote (closing its socket ends it; `kill`: at once, one that failed may be
        hung and is never waited for on a start's path); starts forked from it run on."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            if kill:
                self._proc.kill()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


def _readable(fd: int, timeout_s: float) -> bool:
    """poll(), not select(): a daemon with a thousand databases holds fds past 1,024, which
    select() refuses (found by a storm of 1,000: every start failed with ValueError)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))
