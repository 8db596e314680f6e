"""Talking to a guest: its init's control port (clock and RNG reseed, the pre-opened admin
session, halt; see guest/init.c) and its Postgres as the admin role."""

from __future__ import annotations

import asyncio
import os
import struct
import time

from pgfleet.drivers.base import Backend, DriverError
from pgfleet.pgwire.client import AdminConnection, QueryError

from . import vmm
from .common import CONTROL_PORT, GUEST_ADDR


class GuestCommandError(DriverError):
    """The guest init answered a control command with an error."""


class NoAdminSession(GuestCommandError):
    """The guest init holds no admin session (a template made without one, or it was lost):
    personalising falls back to an admin connection over TCP."""


async def admin(backend: Backend, timeout: float = 10.0) -> AdminConnection:
    async def connect() -> AdminConnection:
        reader, writer = await backend.open_connection()
        return await AdminConnection.open(reader, writer, backend.admin_user, backend.database)
    return await asyncio.wait_for(connect(), timeout)


async def wait_ready(vm: vmm.Vm, backend: Backend, timeout: float) -> None:
    """Poll until Postgres in the guest answers SELECT 1, failing fast if QEMU exits."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not vm.alive():
            raise DriverError(f"the guest stopped while booting ({vm.exit_reason}); "
                              f"console: {vmm.tail(vm.files.console)}")
        try:
            conn = await admin(backend, timeout=1.0)
            try:
                await conn.query("SELECT 1")
                return
            finally:
                await conn.close()
        except (OSError, asyncio.TimeoutError, QueryError, EOFError,
                asyncio.IncompleteReadError) as exc:
            last = exc  # not up yet: no route, refused, "starting up"
        await asyncio.sleep(0.05)
    raise DriverError(f"Postgres in the guest was not ready after {timeout:.0f} s "
                      f"(last error: {last!r}); console: {vmm.tail(vm.files.console)}")


class GuestCommand:
    """The first byte of each command of the guest init's control port (guest/init.c):
    pgfleet's own protocol, not Postgres's."""

    RESEED = b"R"  # + int64 sec + int64 nsec + 64 random bytes: set the clock, reseed the CRNG
    ADMIN_OPEN = b"A"  # open the admin session
    ADMIN_QUERY = b"Q"  # + uint32 length + SQL: run SQL in the admin session
    ADMIN_CLOSE = b"X"  # close the admin session
    HALT = b"H"  # fast-shutdown Postgres, unmount, power off


def reseed_command() -> bytes:
    """Set the guest clock to now and reseed its CRNG with host randomness.

    A restored guest's clock is where the snapshot left it, and every clone of a template
    starts with the same RNG state: both are fixed before anyone else talks to it.
    """
    now = time.time_ns()
    return GuestCommand.RESEED + struct.pack("<qq", now // 10**9, now % 10**9) + os.urandom(64)


def sql_command(sql: str) -> bytes:
    data = sql.encode()
    return GuestCommand.ADMIN_QUERY + struct.pack("<I", len(data)) + data


class GuestControl:
    """Control connections to guest inits, one kept per instance across suspend/resume."""

    def __init__(self) -> None:
        # uuid -> kept control connection to the guest init (see control)
        self._kept: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}

    async def control(self, ns: str, commands: list[bytes], timeout: float = 10.0,
                      keep_for: str | None = None) -> None:
        """Commands to the guest init's control port on one connection (see guest/init.c).

        With keep_for (an instance uuid) the connection is kept and reused next time: it
        survives suspend/resume like any TCP session into the guest, so a wake's reseed
        needs no handshake. A dead kept connection (e.g. after a cold boot) falls back to a
        fresh one; only idempotent commands are ever sent on a reused connection.
        """
        kept = self._kept.pop(keep_for, None) if keep_for else None
        if kept is not None:
            try:
                answers = await asyncio.wait_for(self._exchange(*kept, commands), timeout)
            except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                kept[1].close()
            else:
                self._kept[keep_for] = kept  # type: ignore[index]
                return self._check(commands, answers)

        async def fresh() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, list[bytes]]:
            reader, writer = await Backend(host=GUEST_ADDR, port=CONTROL_PORT,
                                           netns=ns).open_connection()
            try:
                return reader, writer, await self._exchange(reader, writer, commands)
            except BaseException:
                writer.close()
                raise

        reader, writer, answers = await asyncio.wait_for(fresh(), timeout)
        if keep_for and all(a == b"ok\n" for a in answers):
            self._kept[keep_for] = (reader, writer)
        else:
            writer.close()
        self._check(commands, answers)

    @staticmethod
    async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        commands: list[bytes]) -> list[bytes]:
        writer.write(b"".join(commands))  # pipelined: one round trip for all
        await writer.drain()
        answers = []
        for _ in commands:
            line = await reader.readline()
            if not line:
                raise EOFError("guest init closed the control connection")
            answers.append(line)
        return answers

    @staticmethod
    def _check(commands: list[bytes], answers: list[bytes]) -> None:
        for command, answer in zip(commands, answers):
            if answer != b"ok\n":
                text = answer.decode(errors="replace").strip()
                # init's answers for the admin session: "err no admin session",
                # "err admin session: ...", "err admin session lost" (guest/init.c)
                of_session = command[:1] in (GuestCommand.ADMIN_OPEN, GuestCommand.ADMIN_QUERY)
                kind = NoAdminSession if of_session and "admin session" in text else GuestCommandError
                raise kind(f"guest init refused {command[:1]!r}: {text}")

    def drop(self, uuid: str) -> None:
        kept = self._kept.pop(uuid, None)
        if kept is not None:
            kept[1].close()

    def close(self) -> None:
        for _, writer in self._kept.values():
            writer.close()
        self._kept.clear()
