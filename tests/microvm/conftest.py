"""Fixtures for the microvm driver tests: real QEMU (TCG here), real Postgres in the guest.

One driver and one template serve the whole session (the image build and template are cached
in $PGFLEET_CACHE, so only a host's first run pays ~4 min for the kernel). If the image cannot
be built on this machine, every test here is skipped with the reason in capitals.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import uuid
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from pgfleet.drivers.base import Backend, DriverError, InstanceSpec
from pgfleet.pgwire.client import AdminConnection

def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the microvm driver needs root (network namespaces, TAP devices)"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing"
    return None


@pytest.fixture(scope="session")
def image():
    reason = _unavailable()
    if reason is None:
        from pgfleet.drivers.microvm.image import build_image
        try:
            return build_image()  # cached after the first run on a host
        except DriverError as exc:
            reason = f"the guest image cannot be built here: {exc}"
    pytest.skip(f"MICROVM TESTS SKIPPED: {reason.upper()}")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def driver(image, tmp_path_factory) -> AsyncIterator:
    from pgfleet.drivers.microvm import MicroVMDriver

    exits: list[tuple[str, str]] = []
    d = MicroVMDriver(tmp_path_factory.mktemp("microvm-state"),
                      on_exit=lambda spec, reason: exits.append((spec.uuid, reason)))
    d.test_exits = exits  # type: ignore[attr-defined]
    await d.prepare()
    yield d
    await d.close()


_slots = itertools.count(7000 + (os.getpid() % 500) * 4)


def new_spec(root: Path, role: str = "tenant", memory_mb: int = 128) -> InstanceSpec:  # noqa: D103
    slot = next(_slots)
    return InstanceSpec(uuid=str(uuid.uuid4()), name=f"t{slot}", role=role,
                        memory_mb=memory_mb, slot=slot, home=root / f"i{slot}")


@pytest_asyncio.fixture(loop_scope="session")
async def make_instance(driver, tmp_path) -> AsyncIterator[Callable[..., Awaitable[tuple[InstanceSpec, Backend]]]]:
    """Create instances; every one is destroyed at the end of the test, whatever happened."""
    made: list[InstanceSpec] = []

    async def make(role: str = "tenant") -> tuple[InstanceSpec, Backend]:
        spec = new_spec(tmp_path, role)
        made.append(spec)
        return spec, await driver.create(spec)

    yield make
    for spec in made:
        await driver.destroy(spec)


async def connect(backend: Backend, user: str = "postgres", timeout: float = 30.0) -> AdminConnection:
    async def go() -> AdminConnection:
        reader, writer = await backend.open_connection()
        return await AdminConnection.open(reader, writer, user, backend.database)
    return await asyncio.wait_for(go(), timeout)


async def query(backend: Backend, sql: str, user: str = "postgres") -> str | None:
    """Run sql on a new connection; returns the first column of the last result's first row."""
    conn = await connect(backend, user)
    try:
        results = await conn.query(sql)
        last = results[-1]
        return last.rows[0][0] if last.rows else None
    finally:
        await conn.close()
