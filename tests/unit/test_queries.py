"""The read side over the fake driver: lookups, the find() cache against writes, pages and
what a database in standby uses."""

from __future__ import annotations

import pytest

from pgfleet.fleet.errors import NotFound
from pgfleet.fleet.states import State


async def test_get_by_name_or_uuid_and_not_found(fleet):
    row = (await fleet.create("shop")).row
    assert fleet.get("shop").uuid == row.uuid and fleet.get(row.uuid).name == "shop"
    assert fleet.find_uuid(row.uuid).name == "shop" and fleet.find_uuid("nope") is None
    with pytest.raises(NotFound):
        fleet.get("nope")


async def test_find_answers_from_memory_until_the_next_write(fleet):
    await fleet.create("shop", autostart=False)
    first = fleet.find("shop")
    assert first is fleet.find("shop")
    fleet.set_tags("shop", {"team": "a"})
    again = fleet.find("shop")
    assert again is not first and again.tags == {"team": "a"}
    assert fleet.find("nope") is None


async def test_pages_counts_and_history(fleet):
    for name in ("a", "b", "c"):
        await fleet.create(name, autostart=False)
    await fleet.ensure_running("b")
    assert [r.name for r in fleet.page(limit=2)] == ["a", "b"]
    assert [r.name for r in fleet.page(after="b")] == ["c"]
    assert fleet.count_by_state() == {State.STANDBY: 2, State.RUNNING: 1}
    assert [h["to_state"] for h in fleet.history(fleet.get("b").uuid)][:2] == ["running", "starting"]


async def test_a_database_in_standby_uses_nothing(fleet):
    await fleet.create("shop")
    assert (await fleet.usage(fleet.get("shop")))["rss_bytes"] > 0
    row = await fleet.suspend("shop")
    assert await fleet.usage(row) == {} and fleet.memory_charged(row) == (0, 0)
