"""The fleet through its facade over the fake driver: every lifecycle path end to end, in milliseconds."""

from __future__ import annotations

import asyncio

import pytest

from pgfleet.drivers.base import DriverError
from pgfleet.fleet.errors import AlreadyExists, InvalidRequest, NotFound, QuotaExceeded, Unavailable
from pgfleet.fleet.quotas import Quotas
from pgfleet.fleet.runtime import Sessions
from pgfleet.fleet.states import State
from tests.polling import until


async def test_create_runs_and_records_every_transition(fleet, driver):
    created = await fleet.create("shop")
    assert created.row.state == State.RUNNING and created.password
    assert driver.calls["create"] == 1 and created.row.uuid in driver.running
    assert [e["to_state"] for e in fleet.history(created.row.uuid)] == ["running", "starting"]  # newest first
    assert fleet.is_up(created.row.uuid)


async def test_create_refuses_duplicates_bad_names_and_bad_settings(fleet):
    await fleet.create("shop")
    with pytest.raises(AlreadyExists):
        await fleet.create("shop")
    with pytest.raises(InvalidRequest):
        await fleet.create("Bad_Name")
    with pytest.raises(InvalidRequest, match="memory_mb"):
        await fleet.create("tiny", memory_mb=1)
    with pytest.raises(InvalidRequest, match="idle"):
        await fleet.create("idle", policy="idle")  # the fake driver keeps no sessions across a suspend
    assert [r.name for r in fleet.list()] == ["shop"]


async def test_a_failed_create_leaves_nothing(fleet, driver):
    driver.fail_next["create"] = DriverError("no room")
    with pytest.raises(DriverError):
        await fleet.create("shop")
    assert fleet.list() == [] and driver.calls["destroy"] == 1


async def test_suspend_resume_stop_and_a_stopped_database_is_not_woken(fleet, driver):
    row = (await fleet.create("shop")).row
    assert (await fleet.suspend("shop")).state == State.STANDBY and not fleet.is_up(row.uuid)
    await fleet.ensure_running("shop")  # a wake
    assert fleet.get("shop").state == State.RUNNING and driver.calls["start"] == 1
    assert (await fleet.stop("shop")).state == State.STOPPED
    with pytest.raises(Unavailable, match="stopped"):
        await fleet.ensure_running("shop")
    assert (await fleet.resume("shop")).state == State.RUNNING


async def test_many_wakes_at_once_start_the_database_once(fleet, driver):
    await fleet.create("shop", autostart=False)
    driver.start_gate = asyncio.Event()
    wakes = [asyncio.ensure_future(fleet.ensure_running("shop")) for _ in range(20)]
    await until(lambda: driver.calls["start"] == 1, what="the start to begin")
    driver.start_gate.set()
    backends = await asyncio.gather(*wakes)
    assert len(set(backends)) == 1 and driver.calls["start"] == 1


async def test_a_failed_start_goes_back_to_standby_with_the_reason(fleet, driver):
    await fleet.create("shop", autostart=False)
    driver.fail_next["start"] = DriverError("disk gone")
    with pytest.raises(Unavailable, match="disk gone"):
        await fleet.ensure_running("shop")
    row = fleet.get("shop")
    assert row.state == State.STANDBY and row.stop_reason == "start failed"


async def test_a_crash_leaves_standby_and_policy_off_restarts(fleet, driver):
    on = (await fleet.create("on")).row
    off = (await fleet.create("off", policy="off")).row
    driver.crash(fleet.spec(on))
    driver.crash(fleet.spec(off))
    await until(lambda: fleet.get("on").state == State.STANDBY, what="on in standby")
    await until(lambda: fleet.get("off").state == State.RUNNING and driver.calls["start"] == 1,
                what="off restarted")
    assert fleet.get("on").stop_reason == "crashed"


async def test_idle_database_scales_to_zero_after_its_cooldown_not_while_leased(fleet):
    row = (await fleet.create("shop", cooldown_ms=20)).row
    async with fleet.lease(row.uuid):
        assert fleet.sessions(row.uuid) == Sessions(open=1, total=1)
        await asyncio.sleep(0.05)  # longer than the cooldown: a session keeps it up
        assert fleet.get("shop").state == State.RUNNING
    await until(lambda: fleet.get("shop").state == State.STANDBY, what="scale to zero")


async def test_update_set_tags_and_delete(fleet, driver):
    await fleet.create("shop")
    assert (await fleet.update("shop", cooldown_ms=1000, policy="off")).stz_policy == "off"
    assert fleet.set_tags("shop", {"a": 1}).tags == {"a": 1}
    with pytest.raises(InvalidRequest):
        await fleet.update("shop", cooldown_ms=-1)
    await fleet.delete("shop")
    with pytest.raises(NotFound):
        fleet.get("shop")
    assert driver.made == set()


async def test_quotas_on_create_and_on_every_start(fleet):
    fleet.quotas = Quotas(instances=3, live_instances=1, live_memory_mb=10_000)
    await fleet.create("one")
    with pytest.raises(QuotaExceeded, match="live"):
        await fleet.create("two")
    await fleet.suspend("one")
    await fleet.create("two")
    for start in (lambda: fleet.ensure_running("one"), lambda: fleet.resume("one")):
        with pytest.raises(QuotaExceeded):
            await start()
    assert fleet.get("one").state == State.STANDBY
    q, used = fleet.quota_usage()
    assert q is fleet.quotas and used["live_instances"] == 1 and used["instances"] == 2


async def test_the_cooldown_counts_from_running_not_from_a_slow_create(fleet, driver):
    gate = asyncio.Event()
    real_create = driver.create

    async def slow_create(spec):
        await gate.wait()
        return await real_create(spec)
    driver.create = slow_create
    creating = asyncio.ensure_future(fleet.create("slow", cooldown_ms=300))
    await asyncio.sleep(0.4)  # the create call outlasts the cooldown
    gate.set()
    row = (await creating).row
    timer = fleet.rt[row.uuid].idle_timer  # armed for a whole cooldown from now, not already due
    assert fleet.get("slow").state == State.RUNNING
    assert timer is not None and timer.when() - asyncio.get_running_loop().time() > 0.15
