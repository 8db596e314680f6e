"""Recovery at daemon start over the fake driver: what the store says against what the host has."""

from __future__ import annotations

from pgfleet.fleet.manager import Fleet
from pgfleet.fleet.states import State
from pgfleet.store import Store
from tests.fakes import FakeDriver, fake_fleet


async def _crashed_home(tmp_path, states: dict[str, tuple[str, dict]]) -> dict[str, str]:
    """A home whose daemon died with each database recorded in the given state (and columns)."""
    store = Store(tmp_path / "state.db")
    first = Fleet(store, FakeDriver(tmp_path / "fake"), tmp_path)
    uuids = {name: (await first.create(name, autostart=False, policy=cols.pop("policy", "on"))).row.uuid
             for name, (_, cols) in states.items()}
    for name, (state, cols) in states.items():
        sets = ", ".join(f"{k}=?" for k in ("state", *cols))
        store.db.execute(f"UPDATE instances SET {sets} WHERE uuid=?", (state, *cols.values(), uuids[name]))
    store.close()  # no shutdown: the daemon died
    return uuids


async def test_steps_no_process_is_taking_are_recorded_as_what_is_true(tmp_path):
    uuids = await _crashed_home(tmp_path, {
        "draining": (State.DRAINING, {}),
        "stopping": (State.STOPPING, {"stop_reason": "stop"}),
        "alive": (State.RUNNING, {}),
        "dead": (State.RUNNING, {}),
        "always": (State.STANDBY, {"policy": "off"}),
    })
    driver = FakeDriver(tmp_path / "fake")
    driver.made = set(uuids.values())
    driver.running = {uuids["alive"]}
    async with fake_fleet(tmp_path, driver) as fleet:
        state = {name: fleet.get(name).state for name in uuids}
        assert state == {"draining": State.STANDBY, "stopping": State.STOPPED, "alive": State.RUNNING,
                         "dead": State.STANDBY, "always": State.RUNNING}
        assert fleet.is_up(uuids["alive"]) and not fleet.is_known(uuids["dead"])
        assert fleet.get("draining").standby_tier == "cold"
        assert driver.calls["start"] == 1, "only the database that never scales to zero is started"


async def test_recover_rolls_back_half_made_and_finishes_deletions(tmp_path):
    store = Store(tmp_path / "state.db")
    first = Fleet(store, FakeDriver(), tmp_path)
    kept = (await first.create("kept")).row
    gone = (await first.create("gone")).row
    store.update(gone.uuid, deleting=1)
    store.update(kept.uuid, provisioned=1)
    half = (await first.create("half")).row
    store.update(half.uuid, provisioned=0)
    driver = FakeDriver()
    driver.made = {kept.uuid, gone.uuid, half.uuid}
    driver.running = {kept.uuid}
    second = Fleet(store, driver, tmp_path)
    await second.recover()
    assert [r.name for r in second.list()] == ["kept"]
    assert second.get("kept").state == State.RUNNING and second.is_up(kept.uuid)
    await second.shutdown()
    store.close()
