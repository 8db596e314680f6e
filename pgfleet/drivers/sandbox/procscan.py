"""Finding a live postmaster by its data directory, whatever PID namespace it runs in.

postmaster.pid cannot be trusted for this: inside a PID namespace the postmaster is PID 1.
Its working directory, however, is always its data directory, seen from any namespace.
"""

from __future__ import annotations

import os
from pathlib import Path


def find_postmaster(data_dir: Path) -> int | None:
    """Host PID of the postmaster serving `data_dir`, or None."""
    target = os.path.realpath(data_dir)
    found: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry.name}/cwd") != target:
                continue
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        if comm != "postgres":
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        found.append(int(entry.name))
        # the postmaster is the one whose parent is not another postgres of this data dir
        try:
            parent_cwd = os.readlink(f"/proc/{ppid}/cwd")
        except OSError:
            parent_cwd = ""
        if parent_cwd != target:
            return int(entry.name)
    return found[0] if found else None
