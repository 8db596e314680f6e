"""DirWatch: a change in the directory ends the wait at once; without one, the timeout does."""

from __future__ import annotations

import asyncio
import time

from pgfleet.drivers.sandbox.dirwatch import DirWatch


async def test_a_write_ends_the_wait(tmp_path):
    target = tmp_path / "postmaster.pid"
    target.write_text("1\n")
    with DirWatch(tmp_path) as changes:
        assert changes.fd >= 0, "inotify is available on Linux"
        with open(target, "r+") as f:  # rewritten in place, as the postmaster does
            f.write("2\n")
        # a timeout far longer than the test: it must end by the event, not the timeout
        await asyncio.wait_for(changes.changed(60), 10)


async def test_a_created_file_ends_the_wait(tmp_path):
    with DirWatch(tmp_path) as changes:
        (tmp_path / "new").write_text("x")
        await asyncio.wait_for(changes.changed(60), 10)


async def test_no_change_waits_for_the_timeout(tmp_path):
    with DirWatch(tmp_path) as changes:
        started = time.monotonic()
        await changes.changed(0.05)
        assert time.monotonic() - started >= 0.04


async def test_events_seen_once(tmp_path):
    """After a change was seen, the next wait is for a new change (the flag is cleared)."""
    with DirWatch(tmp_path) as changes:
        (tmp_path / "a").write_text("x")
        await asyncio.wait_for(changes.changed(60), 10)
        started = time.monotonic()
        await changes.changed(0.05)
        assert time.monotonic() - started >= 0.04


async def test_a_missing_directory_falls_back_to_polling(tmp_path):
    with DirWatch(tmp_path / "gone") as changes:
        assert changes.fd < 0
        await asyncio.wait_for(changes.changed(60), 10)  # a short poll, not the 60 s
