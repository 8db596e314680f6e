"""The fast layer: no root, no Postgres, no subprocess. A fleet here runs on the fake driver."""

from __future__ import annotations

import pytest

from pgfleet.fleet.manager import Fleet
from pgfleet.store import Store
from tests.fakes import FakeDriver


@pytest.fixture
async def fleet(tmp_path):
    store = Store(tmp_path / "state.db")
    fleet = Fleet(store, FakeDriver(tmp_path / "fake"), tmp_path)
    await fleet.recover()
    try:
        yield fleet
    finally:
        await fleet.shutdown()
        store.close()


@pytest.fixture
def driver(fleet) -> FakeDriver:
    return fleet.driver
