"""The copy-on-write overlay's header and the recorded template image QEMU reads through to
(QEMU itself opens them in tests/microvm and tests/security/test_microvm_backing.py)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from pgfleet.drivers.base import DriverError
from pgfleet.drivers.microvm import qcow2
from pgfleet.drivers.microvm.vmm import (VmFiles, check_backing, data_disk_args, disk_format,
                                         record_backing)


def test_an_overlay_names_its_backing_and_costs_a_few_blocks(tmp_path: Path):
    base = tmp_path / "tpl" / "data.img"
    base.parent.mkdir()
    base.write_bytes(b"\0" * 4096)
    disk = VmFiles(tmp_path).data_cow
    qcow2.write_overlay(disk, base, 8 << 30)
    assert qcow2.backing_file(disk) == base
    head = disk.read_bytes()[:32]
    assert head[:4] == b"QFI\xfb" and struct.unpack(">Q", head[24:32])[0] == 8 << 30
    assert os.stat(disk).st_blocks * 512 <= 64 * 1024  # the L1 table is a hole
    assert not disk.with_name(disk.name + ".part").exists()
    assert VmFiles(tmp_path).disk == disk and disk_format(disk) == "qcow2"
    record_backing(VmFiles(tmp_path), base)
    assert check_backing(VmFiles(tmp_path)) == base  # present: nothing to say


def test_the_recorded_template_image_wins_over_the_header(tmp_path: Path):
    files = VmFiles(tmp_path)
    tpl = tmp_path / "tpl.img"
    tpl.write_bytes(b"\0" * 4096)
    qcow2.write_overlay(files.data_cow, Path("/etc/shadow"), 1 << 30)  # as a hostile QEMU would
    with pytest.raises(DriverError, match="no record of its template image"):
        check_backing(files)
    record_backing(files, tpl)
    assert check_backing(files) == tpl and os.stat(files.backing).st_mode & 0o777 == 0o600
    argv = " ".join(data_disk_args("qcow2", check_backing(files)))
    assert f"filename={tpl}," in argv and "backing=template," in argv and "shadow" not in argv


def test_a_missing_backing_file_is_a_clear_error(tmp_path: Path):
    files = VmFiles(tmp_path)
    qcow2.write_overlay(files.data_cow, tmp_path / "gone" / "data.img", 1 << 30)
    record_backing(files, tmp_path / "gone" / "data.img")
    with pytest.raises(DriverError, match="template image .*gone/data.img, which is missing"):
        check_backing(files)


def test_a_huge_backing_name_in_a_header_is_refused_not_read(tmp_path: Path):
    disk = tmp_path / "data.qcow2"
    qcow2.write_overlay(disk, tmp_path / "tpl.img", 1 << 30)
    with open(disk, "r+b") as f:
        f.seek(16)
        f.write(struct.pack(">I", 0xFFFFFFFF))  # 4 GiB of "name"
    with pytest.raises(ValueError, match="backing file of 4294967295 bytes"):
        qcow2.backing_file(disk)


def test_a_raw_disk_is_not_read_as_qcow2(tmp_path: Path):
    raw = VmFiles(tmp_path).data
    raw.write_bytes(b"\0" * 512)
    assert VmFiles(tmp_path).disk == raw and disk_format(raw) == "raw"
    assert check_backing(VmFiles(tmp_path)) is None
    with pytest.raises(ValueError, match="not a qcow2"):
        qcow2.backing_file(raw)
