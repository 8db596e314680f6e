"""Databases made, changed and removed, over the fake driver: the cold create, slots,
credentials, settings."""

from __future__ import annotations

import asyncio

import pytest

from pgfleet.drivers.base import DriverError
from pgfleet.fleet.errors import InvalidRequest
from pgfleet.fleet.states import State
from tests.fakes import FakeDriver, fake_fleet


@pytest.fixture
async def provisioning_fleet(tmp_path):
    """A fleet whose driver lays out data without starting it (a create without autostart)."""
    async with fake_fleet(tmp_path, FakeDriver(tmp_path / "fake", can_provision=True)) as fleet:
        yield fleet


async def test_a_create_without_autostart_never_starts_and_is_recorded_once(provisioning_fleet):
    fleet, driver = provisioning_fleet, provisioning_fleet.driver
    row = (await fleet.create("shop", autostart=False)).row
    assert row.state == State.STANDBY and row.provisioned == 1
    assert driver.calls["provision"] == 1 and driver.calls["start"] == 0 and driver.calls["create"] == 0
    assert [h["to_state"] for h in fleet.history(row.uuid)] == ["standby"]
    await fleet.ensure_running("shop")
    assert fleet.get("shop").state == State.RUNNING and driver.calls["start"] == 1


async def test_a_failed_cold_create_leaves_nothing(provisioning_fleet):
    fleet, driver = provisioning_fleet, provisioning_fleet.driver
    driver.fail_next["provision"] = DriverError("no room")
    with pytest.raises(DriverError):
        await fleet.create("shop", autostart=False)
    assert fleet.list() == [] and driver.calls["destroy"] == 1


async def test_concurrent_creates_get_distinct_slots_and_a_deleted_slot_is_reused(provisioning_fleet):
    fleet = provisioning_fleet
    made = await asyncio.gather(*(fleet.create(f"db{i}", autostart=False) for i in range(4)))
    assert sorted(c.row.slot for c in made) == [1, 2, 3, 4]
    freed = fleet.get("db1").slot
    await fleet.delete("db1")
    assert (await fleet.create("again", autostart=False)).row.slot == freed
    assert sorted(r.slot for r in fleet.list()) == [1, 2, 3, 4]


async def test_rotate_password_replaces_the_verifier(fleet):
    created = await fleet.create("shop")
    row, password = await fleet.rotate_password("shop")
    assert password != created.password and row.verifier != created.row.verifier
    assert (await fleet.rotate_password("shop", "chosen-password-1"))[1] == "chosen-password-1"


async def test_update_checks_each_setting_and_the_driver(fleet):
    await fleet.create("shop")
    with pytest.raises(InvalidRequest, match="disk_mb is not enforced"):
        await fleet.update("shop", disk_mb=1024)
    with pytest.raises(InvalidRequest, match="cpu_pct must be 0 \\(no cap\\) or an integer"):
        await fleet.update("shop", cpu_pct=5)
    with pytest.raises(TypeError, match="not a database setting"):
        await fleet.update("shop", colour=3)
    row = await fleet.update("shop", memory_mb=256, cold_after_ms=None)
    assert row.memory_mb == 256
