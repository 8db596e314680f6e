"""A fake isolation driver: the driver interface in memory, for fleet and API tests that
need neither root nor Postgres. It keeps what a real driver would (which instances run),
counts the calls, and lets a test make a call fail, hold a start open, or crash an instance."""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from pgfleet.drivers.base import Backend, Driver, DriverError, InstanceSpec
from pgfleet.fleet.manager import Fleet
from pgfleet.store import Store


class FakeDriver(Driver):
    name = "fake"

    def __init__(self, state_dir: Path | None = None, *, keeps_sessions: bool = False,
                 can_provision: bool = False, warm: bool = False) -> None:
        super().__init__(state_dir or Path("/nonexistent/fake-driver"))
        self.keeps_sessions_across_suspend = keeps_sessions  # type: ignore[misc]
        self.can_provision = can_provision  # type: ignore[misc]
        self.warm = warm  # freezes (warm standby) as the sandbox driver does without swap
        #: running instances whose processes are frozen (a subset of `running`)
        self.frozen: set[str] = set()
        self.calls: Counter[str] = Counter()
        self.running: set[str] = set()
        self.made: set[str] = set()
        #: the next call of that name raises this (once)
        self.fail_next: dict[str, BaseException] = {}
        #: while set, start() waits for it (concurrent wakes pile up behind one start)
        self.start_gate: asyncio.Event | None = None

    def _call(self, what: str) -> None:
        self.calls[what] += 1
        exc = self.fail_next.pop(what, None)
        if exc is not None:
            raise exc

    def backend(self, spec: InstanceSpec) -> Backend:
        return Backend(host="127.0.0.1", port=50_000 + spec.slot)

    async def prepare(self) -> None:
        self._call("prepare")

    async def create(self, spec: InstanceSpec) -> Backend:
        self._call("create")
        self.made.add(spec.uuid)
        self.running.add(spec.uuid)
        return self.backend(spec)

    async def provision(self, spec: InstanceSpec) -> None:
        self._call("provision")
        self.made.add(spec.uuid)

    async def start(self, spec: InstanceSpec) -> Backend:
        self._call("start")
        if spec.uuid not in self.made:
            raise DriverError(f"{spec.name} has no data")
        if self.start_gate is not None:
            await self.start_gate.wait()
        self.running.add(spec.uuid)
        return self.backend(spec)

    async def suspend(self, spec: InstanceSpec) -> None:
        self._call("suspend")
        self._gone(spec)

    async def stop(self, spec: InstanceSpec) -> None:
        self._call("stop")
        self._gone(spec)

    async def destroy(self, spec: InstanceSpec) -> None:
        self._call("destroy")
        self._gone(spec)
        self.made.discard(spec.uuid)

    def _gone(self, spec: InstanceSpec) -> None:
        self.running.discard(spec.uuid)
        self.frozen.discard(spec.uuid)

    def warm_mode(self) -> str | None:
        return "freeze" if self.warm else None

    async def freeze(self, spec: InstanceSpec) -> int:
        self._call("freeze")
        if not self.warm or spec.uuid not in self.running:
            raise DriverError(f"{spec.name} cannot be frozen")
        self.frozen.add(spec.uuid)
        return spec.memory_mb << 20

    async def thaw(self, spec: InstanceSpec) -> Backend:
        self._call("thaw")
        if spec.uuid not in self.frozen:
            raise DriverError(f"{spec.name}'s frozen processes are gone")
        self.frozen.discard(spec.uuid)
        return self.backend(spec)

    def is_frozen(self, spec: InstanceSpec) -> bool:
        return spec.uuid in self.frozen

    async def recover(self, spec: InstanceSpec) -> Backend | None:
        self._call("recover")
        return self.backend(spec) if spec.uuid in self.running else None

    async def usage(self, spec: InstanceSpec) -> dict[str, int]:
        return {"rss_bytes": spec.memory_mb << 19} if spec.uuid in self.running else {}

    def crash(self, spec: InstanceSpec, reason: str = "killed") -> None:
        """The instance dies on its own, as a real one would report it."""
        self._gone(spec)
        self.on_exit(spec, reason)


@asynccontextmanager
async def fake_fleet(home: Path, driver: FakeDriver | None = None) -> AsyncIterator[Fleet]:
    """A recovered fleet on `driver` (a FakeDriver by default) with its store under `home`,
    shut down and closed on the way out."""
    store = Store(home / "state.db")
    fleet = Fleet(store, driver or FakeDriver(home / "fake"), home)
    await fleet.recover()
    try:
        yield fleet
    finally:
        await fleet.shutdown()
        store.close()


class FakeTransport(asyncio.Transport):
    """An asyncio transport in memory: what is written to it is kept in `written`, and a
    test hands its protocol reads with `protocol.data_received`."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.protocol: asyncio.BaseProtocol | None = None
        self.reading = True
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def take(self) -> bytes:
        """What was written since the last take."""
        out = bytes(self.written)
        self.written.clear()
        return out

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol  # type: ignore[return-value]

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed
