"""The fleet's background chores: a tick every interval until closed; a failing tick is not fatal."""

from __future__ import annotations

from pgfleet.fleet.periodic import Chore
from tests.polling import until


async def test_a_chore_ticks_through_failures_until_closed():
    ticks: list[int] = []

    async def tick() -> None:
        ticks.append(len(ticks))
        if len(ticks) == 1:
            raise RuntimeError("the first tick fails")

    chore = Chore(0.001, tick, "test chore")
    chore.start()
    chore.start()  # a second start does not start a second loop
    await until(lambda: len(ticks) >= 3, what="ticks after a failing one")
    await chore.close()
    stopped_at = len(ticks)
    await chore.close()  # closing twice is harmless
    assert ticks == list(range(stopped_at))
