"""Finding a live postmaster by its data directory, whatever PID namespace it runs in.

postmaster.pid cannot be trusted for this: inside a PID namespace the postmaster is PID 1.
Its working directory, however, is always its data directory, seen from any namespace.
"""

from __future__ import annotations

import os
from pathlib import Path


def find_postmaster(data_dir: Path) -> int | None:
    """Host PID of the postmaster serving `data_dir`, or None."""
    return find_postmasters().get(os.path.realpath(data_dir))


def find_postmasters() -> dict[str, int]:
    """Every live postmaster on the host, by its (real) data directory: one pass over /proc
    however many databases are asked about."""
    postgres: dict[int, tuple[str, int]] = {}  # pid -> (cwd, parent pid)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            if stat[stat.index("(") + 1 : stat.rindex(")")] != "postgres":
                continue
            cwd = os.readlink(f"/proc/{entry.name}/cwd")
        except (OSError, ValueError):
            continue
        postgres[int(entry.name)] = (cwd, int(stat[stat.rindex(")") + 2 :].split()[1]))
    found: dict[str, int] = {}
    for pid, (cwd, ppid) in sorted(postgres.items()):
        # the postmaster is the one whose parent is not another postgres of this data dir
        parent = postgres.get(ppid)
        if parent is None or parent[0] != cwd:
            found[cwd] = pid
        else:
            found.setdefault(cwd, pid)
    return found
