"""pgfleet-jail (jail.c): the private root, privilege drop and seccomp filter every process of a
sandboxed database starts under; its `-j` step (join cgroups, then exec) also starts each
microVM's QEMU in its own memory cgroup. Compiled once per source version into the cache (a C program:
it runs on every wake, where an interpreter's start-up would cost more than the whole jail).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from pathlib import Path

from .base import DriverError, DriverUnavailable

SOURCE = Path(__file__).with_name("jail.c")


def _jail_name() -> str:
    return f"pgfleet-jail-{hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]}"


def jail_path(cache_dir: Path) -> Path:
    return cache_dir / "bin" / _jail_name()


def prebuilt_path() -> Path:
    """Where an installation ships the jail built for this source (the container image does:
    it has no C compiler): beside the source, in the root-owned package directory."""
    return SOURCE.with_name(_jail_name())


async def ensure_jail(cache_dir: Path) -> Path:
    """The compiled jail for this source: shipped prebuilt, or built (atomically) if missing."""
    if prebuilt_path().exists():
        return prebuilt_path()
    final = jail_path(cache_dir)
    if not final.exists():
        await _compile(final, [str(SOURCE)], [["-static"], []])
    return final


ZYGOTE_SOURCE = SOURCE.with_name("zygote.c")


def _zygote_name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + ZYGOTE_SOURCE.read_bytes()).hexdigest()[:12]
    return f"pgfleet-zygote-{digest}.so"


def prebuilt_zygote_path() -> Path:
    """Where an installation ships the zygote library built for this source (as the jail)."""
    return SOURCE.with_name(_zygote_name())


async def ensure_zygote(cache_dir: Path) -> Path | None:
    """The zygote library (zygote.c) for this source: shipped beside the source, or built into
    the cache; None without a C compiler (every start then execs postgres: ~9 ms more)."""
    if prebuilt_zygote_path().exists():
        return prebuilt_zygote_path()
    final = cache_dir / "bin" / _zygote_name()
    if not final.exists():
        try:
            await _compile(final, ["-shared", "-fPIC", str(ZYGOTE_SOURCE)], [[]])
        except (DriverError, DriverUnavailable):
            return None
    return final


async def _compile(final: Path, args: list[str], variants: list[list[str]]) -> None:
    """cc -O2 `args` into `final` (atomically), with the first of `variants` that builds."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise DriverUnavailable("pgfleet needs a C compiler to build its jail (run `make deps`)")
    final.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(final.parent, 0o755)
    tmp = final.with_name(f".{final.name}.{os.getpid()}")
    for extra in variants:
        # static where it can be: nothing is loaded from the host's library path while the jail runs as root
        proc = await asyncio.create_subprocess_exec(
            cc, "-O2", "-Wall", *extra, "-o", str(tmp), *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        if proc.returncode == 0:
            break
    else:
        raise DriverError(f"building {final.name} failed: {out.decode(errors='replace').strip()[-500:]}")
    os.chmod(tmp, 0o755)
    tmp.rename(final)


def jail_argv(jail: Path, uid: int, tmp_mb: int, data: Path, sockets: Path, auth: Path,
              argv: list[str], cgroup_procs: list[str], wait_detach: bool = False,
              wal: Path | None = None) -> list[str]:
    """`argv` in the instance's cgroups (`cgroup_procs`: its cgroup.procs files), in fresh
    mount, PID, IPC, UTS, network and cgroup namespaces (PID 1 of the new PID namespace, killed
    with the process the caller spawns), jailed (see jail.c). The cgroups are joined first, so
    the cgroup namespace is rooted at the instance's own cgroup. One exec of a static binary
    (`pgfleet-jail -n`); the caller spawns it with no Python code between fork and exec, which
    lets the daemon vfork."""
    return [
        str(jail), "-n", *cgroup_procs, "--", *(["-w"] if wait_detach else []), str(uid), str(tmp_mb),
        os.path.realpath(data), os.path.realpath(sockets), os.path.realpath(auth),
        *([os.path.realpath(wal)] if wal is not None else []), "--", *argv,
    ]
