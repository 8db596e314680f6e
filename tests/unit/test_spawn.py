"""drivers/spawn.py: a child started without asyncio's subprocess machinery, awaited on a pidfd."""

from __future__ import annotations

import asyncio
import signal

from pgfleet.drivers.spawn import spawn


async def test_exit_status_is_awaited():
    proc = spawn(["sh", "-c", "exit 7"])
    assert await asyncio.wait_for(proc.wait(), 30) == 7
    assert proc.returncode == 7


async def test_a_running_child_has_no_returncode_until_killed():
    proc = spawn(["sleep", "60"])
    assert proc.returncode is None
    proc.kill()
    assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL
    proc.kill()  # killing an exited child is harmless


async def test_output_goes_where_asked(tmp_path):
    out = tmp_path / "out"
    with open(out, "wb") as f:
        proc = spawn(["sh", "-c", "echo hello; echo oops >&2"], stdout=f, stderr=f)
    await asyncio.wait_for(proc.wait(), 30)
    assert sorted(out.read_text().split()) == ["hello", "oops"]
