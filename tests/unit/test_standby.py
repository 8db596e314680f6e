"""The warm tier over the fake driver: frozen instead of stopped, thawed on a wake, cold
after cold_after_ms, on a crash, at shutdown; recovery trusts the host, not the record."""

from __future__ import annotations

import pytest

from pgfleet.fleet.errors import Unavailable
from pgfleet.fleet.manager import Fleet
from pgfleet.fleet.states import State
from pgfleet.store import Store
from tests.fakes import FakeDriver, fake_fleet
from tests.polling import until


@pytest.fixture
async def warm_fleet(tmp_path):
    async with fake_fleet(tmp_path, FakeDriver(tmp_path / "fake", warm=True)) as fleet:
        yield fleet


def tier(fleet: Fleet, name: str) -> tuple[str, str | None]:
    row = fleet.get(name)
    return row.state, row.standby_tier


async def test_idle_goes_warm_and_a_wake_thaws_it(warm_fleet):
    fleet, driver = warm_fleet, warm_fleet.driver
    await fleet.create("shop", cooldown_ms=10)
    await until(lambda: tier(fleet, "shop") == (State.STANDBY, "warm"), what="warm standby")
    assert driver.calls["freeze"] == 1 and driver.calls["suspend"] == 0
    await fleet.ensure_running("shop")
    assert tier(fleet, "shop") == (State.RUNNING, None) and driver.calls["thaw"] == 1 and driver.calls["start"] == 0


async def test_idle_policy_an_idle_session_stays_open_across_warm_standby(tmp_path):
    async with fake_fleet(tmp_path, FakeDriver(tmp_path / "fake", warm=True, keeps_sessions=True)) as fleet:
        row = (await fleet.create("shop", policy="idle", cooldown_ms=10)).row
        async with fleet.lease(row.uuid):
            fleet.session_busy(row.uuid, True)  # one transaction; its end starts the countdown
            fleet.session_busy(row.uuid, False)
            await until(lambda: tier(fleet, "shop") == (State.STANDBY, "warm"), what="warm with a session open")
            assert fleet.sessions(row.uuid).open == 1
            await fleet.ensure_running("shop")
            assert fleet.driver.calls["thaw"] == 1


async def test_warm_goes_cold_after_cold_after_ms(warm_fleet):
    fleet, driver = warm_fleet, warm_fleet.driver
    await fleet.create("shop", cold_after_ms=10)
    await fleet.suspend("shop", tier="warm")
    await until(lambda: tier(fleet, "shop") == (State.STANDBY, "cold"), what="cold after cold_after_ms")
    assert driver.calls["suspend"] == 1 and not driver.frozen


async def test_a_warm_database_whose_processes_died_is_started_cold(warm_fleet):
    fleet, driver = warm_fleet, warm_fleet.driver
    row = (await fleet.create("shop")).row
    await fleet.suspend("shop", tier="warm")
    driver.frozen.discard(row.uuid)  # the frozen processes vanished without a word
    await fleet.ensure_running("shop")
    assert fleet.get("shop").state == State.RUNNING and driver.calls["start"] == 1
    reasons = [h["reason"] for h in fleet.history(row.uuid)]
    assert "thaw failed" in reasons


async def test_a_crash_while_warm_leaves_it_cold(warm_fleet):
    fleet, driver = warm_fleet, warm_fleet.driver
    row = (await fleet.create("shop")).row
    await fleet.suspend("shop", tier="warm")
    driver.crash(fleet.spec(row))
    await until(lambda: tier(fleet, "shop") == (State.STANDBY, "cold"), what="cold after the crash")


async def test_never_frozen_mid_transaction(warm_fleet):
    fleet = warm_fleet
    row = (await fleet.create("shop")).row
    async with fleet.lease(row.uuid):
        fleet.session_busy(row.uuid, True)
        with pytest.raises(Unavailable, match="busy session"):
            await fleet.suspend("shop", tier="warm")
        fleet.session_busy(row.uuid, False)
    assert fleet.get("shop").state == State.RUNNING


async def test_shutdown_leaves_nothing_frozen_and_recovery_trusts_the_host(tmp_path):
    store = Store(tmp_path / "state.db")
    driver = FakeDriver(tmp_path / "fake", warm=True)
    first = Fleet(store, driver, tmp_path)
    await first.create("kept")
    gone = (await first.create("gone")).row
    for name in ("kept", "gone"):
        await first.suspend(name, tier="warm")
    driver.frozen.discard(gone.uuid)
    driver.running.discard(gone.uuid)
    second = Fleet(store, driver, tmp_path)  # the daemon died: a second life on the same host
    await second.recover()
    assert tier(second, "kept") == (State.STANDBY, "warm") and tier(second, "gone") == (State.STANDBY, "cold")
    await second.shutdown()
    assert tier(second, "kept") == (State.STANDBY, "cold") and driver.frozen == set()
    store.close()


def test_memory_pressure_reads_the_full_line_not_some(tmp_path):
    """The fleet's own reclaim raises `some` with every freeze; only `full` is the host's."""
    from pgfleet.fleet.memory import memory_pressure

    psi = tmp_path / "memory"
    psi.write_text("some avg10=42.00 avg60=10.00 avg300=2.00 total=1\n"
                   "full avg10=3.50 avg60=1.00 avg300=0.20 total=1\n")
    assert memory_pressure(psi) == 3.5
    psi.write_text("some avg10=42.00 avg60=10.00 avg300=2.00 total=1\n")  # no full line: no signal
    assert memory_pressure(psi) is None
    assert memory_pressure(tmp_path / "absent") is None
