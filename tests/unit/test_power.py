"""Up and down over the fake driver: draining, the tiers a suspend may ask for, stop vs standby."""

from __future__ import annotations

import asyncio

import pytest

from pgfleet.fleet.errors import InvalidRequest
from pgfleet.fleet.states import State
from tests.polling import until


async def test_a_suspend_drains_open_sessions_before_stopping(fleet, driver):
    row = (await fleet.create("shop")).row
    async with fleet.lease(row.uuid):
        suspending = asyncio.ensure_future(fleet.suspend("shop", drain_timeout_s=30))
        await until(lambda: fleet.get("shop").state == State.DRAINING, what="draining")
        assert driver.calls["suspend"] == 0, "the driver is not asked while a session is open"
    row = await suspending
    assert row.state == State.STANDBY and row.standby_tier == "cold" and driver.calls["suspend"] == 1


async def test_a_drain_timeout_closes_what_is_left(fleet, driver):
    row = (await fleet.create("shop")).row
    async with fleet.lease(row.uuid):
        assert (await fleet.suspend("shop", drain_timeout_s=0.01)).state == State.STANDBY


async def test_warm_standby_needs_a_driver_that_freezes_and_tiers_are_checked(fleet):
    await fleet.create("shop")
    with pytest.raises(InvalidRequest, match="warm standby"):
        await fleet.suspend("shop", tier="warm")
    with pytest.raises(InvalidRequest, match="tier"):
        await fleet.suspend("shop", tier="lukewarm")
    assert fleet.get("shop").state == State.RUNNING


async def test_stop_and_suspend_move_between_standby_and_stopped_without_the_driver(fleet, driver):
    await fleet.create("shop")
    await fleet.stop("shop")
    assert fleet.get("shop").stop_reason == "stop" and driver.calls["stop"] == 1
    assert (await fleet.suspend("shop")).state == State.STANDBY
    assert (await fleet.stop("shop")).state == State.STOPPED
    assert driver.calls["stop"] == 1 and driver.calls["suspend"] == 0


async def test_if_unused_leaves_a_database_in_use_running(fleet, driver):
    row = (await fleet.create("shop")).row
    async with fleet.lease(row.uuid):
        assert (await fleet.suspend("shop", if_unused=True)).state == State.RUNNING
    assert driver.calls["suspend"] == 0
