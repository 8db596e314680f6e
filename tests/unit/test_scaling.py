"""Scale to zero over the fake driver: what keeps a database up under each policy."""

from __future__ import annotations

import pytest

from pgfleet.fleet.states import State
from tests.fakes import FakeDriver, fake_fleet
from tests.polling import until


@pytest.fixture
async def idle_fleet(tmp_path):
    """A fleet whose driver keeps sessions across a suspend, so the `idle` policy is allowed."""
    async with fake_fleet(tmp_path, FakeDriver(tmp_path / "fake", keeps_sessions=True)) as fleet:
        yield fleet


async def test_idle_policy_an_open_session_counts_only_while_busy(idle_fleet):
    fleet = idle_fleet
    row = (await fleet.create("shop", policy="idle", cooldown_ms=10)).row
    async with fleet.lease(row.uuid) as rt:
        fleet.session_busy(row.uuid, True)
        assert fleet.in_use(row.uuid) and rt.idle_timer is None
        fleet.session_busy(row.uuid, False)
        assert not fleet.in_use(row.uuid) and rt.idle_timer is not None
        await until(lambda: fleet.get("shop").state == State.STANDBY, what="scale to zero with a session open")
        assert fleet.sessions(row.uuid).open == 1


async def test_on_policy_any_session_keeps_it_up(fleet):
    row = (await fleet.create("shop", cooldown_ms=10)).row
    async with fleet.lease(row.uuid) as rt:
        fleet.session_busy(row.uuid, True)
        fleet.session_busy(row.uuid, False)
        assert fleet.in_use(row.uuid) and rt.idle_timer is None
    assert not fleet.in_use(row.uuid)
    await until(lambda: fleet.get("shop").state == State.STANDBY, what="scale to zero once the session ends")


async def test_off_policy_never_counts_down(fleet):
    row = (await fleet.create("shop", policy="off", cooldown_ms=0)).row
    async with fleet.lease(row.uuid) as rt:
        pass
    assert rt.idle_timer is None and fleet.get("shop").state == State.RUNNING


async def test_an_unbalanced_session_end_does_not_go_negative(fleet):
    row = (await fleet.create("shop", cooldown_ms=60_000)).row
    async with fleet.lease(row.uuid) as rt:
        fleet.session_busy(row.uuid, False)
        assert rt.busy == 0
    fleet.session_busy("unknown", True)  # a database the fleet holds nothing for: ignored
