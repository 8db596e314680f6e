"""The fast layer: no root, no Postgres, no subprocess. A fleet here runs on the fake driver."""

from __future__ import annotations

import pytest

from tests.fakes import FakeDriver, fake_fleet


@pytest.fixture
async def fleet(tmp_path):
    async with fake_fleet(tmp_path) as fleet:
        yield fleet


@pytest.fixture
def driver(fleet) -> FakeDriver:
    return fleet.driver
