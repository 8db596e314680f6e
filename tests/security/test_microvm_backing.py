"""A guest that escapes into QEMU holds its copy-on-write disk read-write and can rewrite the
qcow2 header's backing file name: at the next start, a QEMU that followed the header (opening
it while still root) would give the tenant /etc/shadow or another tenant's disk. pgfleet hands
QEMU the template image it recorded itself, and QEMU never opens the name in the header."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from pgfleet.drivers.microvm.vmm import VmFiles

from ..microvm.conftest import driver, image, make_instance, query  # noqa: F401 (fixtures)
from ..microvm.test_microvm import qemu_pids

pytestmark = [pytest.mark.microvm, pytest.mark.asyncio(loop_scope="session")]


def rename_backing(disk: Path, name: Path) -> None:
    """Point the header's backing file name at `name`, in place, as a hostile QEMU could:
    the name is written where the old one was (the overlay's first cluster has room)."""
    with open(disk, "r+b") as f:
        head = f.read(20)
        offset = struct.unpack(">Q", head[8:16])[0]
        encoded = str(name).encode()
        f.seek(offset)
        f.write(encoded)
        f.seek(16)
        f.write(struct.pack(">I", len(encoded)))


def open_files(pid: int) -> set[str]:
    fds = Path(f"/proc/{pid}/fd")
    names = set()
    for fd in fds.iterdir():
        try:
            names.add(os.readlink(fd))
        except OSError:
            continue
    return names


async def test_a_rewritten_backing_name_is_never_opened(driver, make_instance, tmp_path):  # noqa: F811
    from pgfleet.drivers.microvm.qcow2 import backing_file

    tpl = driver._templates[(128, 1)]
    spec, backend = await make_instance()
    await query(backend, "CREATE TABLE mine AS SELECT 'tenant data' AS v", "tenant")
    await query(backend, "CHECKPOINT")
    await driver.suspend(spec)

    secret = tmp_path / "root-only-secret.img"
    secret.write_bytes(b"PGFLEET-SECRET-MARKER\n" * 4096)  # not an ext4 image: boot would fail on it
    os.chmod(secret, 0o600)
    files = VmFiles(spec.home)
    rename_backing(files.data_cow, secret)
    assert backing_file(files.data_cow) == secret

    await driver.start(spec)  # restore from the snapshot, on the recorded chain
    [pid] = qemu_pids(spec.home)
    opened = open_files(pid)
    assert str(tpl.files.data) in opened, opened
    assert str(secret) not in opened, "QEMU opened the file the tenant's header names"
    assert await query(backend, "SELECT v FROM mine", "tenant") == "tenant data"

    await driver.stop(spec)
    await driver.start(spec)  # a cold boot mounts the disk afresh: every block read from the chain
    assert driver.last_timings.get("mode") == 1.0
    [pid] = qemu_pids(spec.home)
    assert str(secret) not in open_files(pid)
    assert await query(backend, "SELECT v FROM mine", "tenant") == "tenant data"
