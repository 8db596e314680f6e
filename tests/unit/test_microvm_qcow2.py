"""The copy-on-write overlay's header (QEMU itself opens them in tests/microvm)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from pgfleet.drivers.base import DriverError
from pgfleet.drivers.microvm import qcow2
from pgfleet.drivers.microvm.vmm import VmFiles, check_backing, disk_format


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
    check_backing(disk)  # present: nothing to say


def test_a_missing_backing_file_is_a_clear_error(tmp_path: Path):
    disk = tmp_path / "data.qcow2"
    qcow2.write_overlay(disk, tmp_path / "gone" / "data.img", 1 << 30)
    with pytest.raises(DriverError, match="template image .*gone/data.img, which is missing"):
        check_backing(disk)


def test_a_raw_disk_is_not_read_as_qcow2(tmp_path: Path):
    raw = VmFiles(tmp_path).data
    raw.write_bytes(b"\0" * 512)
    assert VmFiles(tmp_path).disk == raw and disk_format(raw) == "raw"
    check_backing(raw)
    with pytest.raises(ValueError, match="not a qcow2"):
        qcow2.backing_file(raw)
