"""The guest image: built once per host, cached by content, within its size targets."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pgfleet.drivers.microvm import kvm_works
from pgfleet.drivers.microvm.image import build_image, list_images

pytestmark = pytest.mark.microvm


def test_image_is_cached_and_small(image):
    t0 = time.monotonic()
    again = build_image()
    assert time.monotonic() - t0 < 2.0, "a second build with unchanged inputs must hit the cache"
    assert again.key == image.key and again.dir == image.dir
    assert image.kernel_bytes <= 4 * 1024 * 1024, f"kernel {image.kernel_bytes} B > 4 MB"
    assert image.rootfs_bytes <= 60 * 1000 * 1000, f"rootfs {image.rootfs_bytes} B > 60 MB"
    assert any(i.key == image.key for i in list_images())
    assert not str(image.dir).startswith(str(Path(__file__).resolve().parents[2])), \
        "the cache must live outside the checkout"


def test_kvm_probe_recognises_a_guest_that_really_ran(image):
    from pgfleet.drivers.microvm.probe import _boot_probe

    # The same probe under TCG must succeed: it proves the verdict is about KVM, not the probe.
    assert _boot_probe(image.kernel, timeout=60, accel="tcg") is True


def test_kvm_probe_gives_a_cached_verdict():
    first = kvm_works()
    t0 = time.monotonic()
    assert kvm_works() is first
    assert time.monotonic() - t0 < 0.1




def test_image_cli_lists_the_cached_image(image):
    import json

    from typer.testing import CliRunner

    from pgfleet.cli.image import image_app

    runner = CliRunner()
    built = runner.invoke(image_app, ["build", "postgres:15", "--json"])
    assert built.exit_code == 0, built.output
    assert json.loads(built.stdout)["key"] == image.key
    listed = runner.invoke(image_app, ["list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {r["key"]: r for r in json.loads(listed.stdout)}
    row = rows[image.key]
    assert row["name"] == "postgres:15" and row["current"] is True
    assert row["kernel_bytes"] == image.kernel_bytes and row["rootfs_bytes"] == image.rootfs_bytes
    assert row["built_at"] > 0


def test_unknown_images_are_refused_clearly():
    from pgfleet.drivers.base import DriverError

    with pytest.raises(DriverError, match="postgres:<major>"):
        build_image("mysql:8")
    with pytest.raises(DriverError, match="only postgres:15"):
        build_image("postgres:9")


def test_prune_keeps_images_in_use(image, tmp_path):
    import json
    import shutil

    from pgfleet.drivers.microvm.image import Image, prune_images, register_user

    cache = tmp_path / "cache"
    old_dir = cache / "images" / "postgres-15-0000000000000000"
    old_dir.mkdir(parents=True)
    old = Image.from_json({**image.to_json(), "key": "0" * 16, "dir": str(old_dir)})
    (old_dir / "image.json").write_text(json.dumps(old.to_json()))
    home = tmp_path / "instance"
    home.mkdir()
    register_user(old.dir, "some-uuid", home)
    # ... and a template of it whose data image a copy-on-write disk reads through to
    tpl_dir = cache / "templates" / "1111111111111111"
    tpl_dir.mkdir(parents=True)
    (tpl_dir / "template.json").write_text(json.dumps(
        {"image": old.key, "accel": "tcg", "memory_mb": 128, "vcpus": 1}))
    register_user(tpl_dir, "some-uuid", home)
    assert prune_images(cache) == [], "an image or template an instance still needs must be kept"
    shutil.rmtree(home)  # the instance is gone (its references are stale)
    assert sorted(prune_images(cache, dry_run=True)) == sorted([old_dir, tpl_dir]) and old_dir.exists()
    assert sorted(prune_images(cache)) == sorted([old_dir, tpl_dir])
    assert not old_dir.exists() and not tpl_dir.exists()


def _memory_image(elf: bytes) -> tuple[int, bytearray]:
    """What a loader puts in guest memory: PT_LOAD bytes at p_paddr, zeros up to p_memsz."""
    import struct

    phoff, = struct.unpack_from("<Q", elf, 32)
    phnum, = struct.unpack_from("<H", elf, 56)
    segs = []
    for i in range(phnum):
        p_type, _f, off, _va, pa, filesz, memsz, _al = struct.unpack_from("<IIQQQQQQ", elf, phoff + 56 * i)
        if p_type == 1:
            segs.append((pa, elf[off:off + filesz], memsz))
    lo = min(pa for pa, _, _ in segs)
    mem = bytearray(max(pa + memsz for pa, _, memsz in segs) - lo)
    for pa, body, _ in segs:
        mem[pa - lo:pa - lo + len(body)] = body
    return lo, mem


def _elf(segments: list[tuple[int, int, bytes, int]], note: bytes) -> bytes:
    """A little ELF64: (p_type, flags, bytes, memsz) segments, loaded from 16 MiB up."""
    import struct

    n = len(segments) + 1
    offset, addr = 64 + 56 * n, 0x1000000
    phdrs, blobs = b"", b""
    for p_type, flags, body, memsz in segments:
        phdrs += struct.pack("<IIQQQQQQ", p_type, flags, offset, 0xffffffff80000000 + addr, addr,
                             len(body), memsz, 0x200000)
        blobs += body
        offset += len(body)
        addr += memsz
    phdrs += struct.pack("<IIQQQQQQ", 4, 4, offset, 0, 0, len(note), len(note), 4)
    blobs += note
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 2, 62, 1,
                       0x1000000, 64, 0, 0, 64, 56, n, 64, 0, 0)
    return ehdr + phdrs + blobs


def test_packing_the_pvh_kernel_keeps_its_memory_image():
    import os
    import struct

    from pgfleet.drivers.base import DriverError
    from pgfleet.drivers.microvm.kernel import pack_pvh_elf

    pvh_note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x1000000)
    page = 4096
    text = (os.urandom(3 * page + 100) + b"\xcc" * (page - 100) + b"\xcc" * 64 * page  # int3 pad
            + os.urandom(page) + bytes(32 * page) + os.urandom(10))  # a zero run: also padding
    data = os.urandom(2 * page) + bytes(100 * page) + os.urandom(page) + bytes(3 * page)
    elf = _elf([(1, 5, text, len(text) + 8 * page), (1, 6, data, len(data) + 50 * page)], pvh_note)
    packed = pack_pvh_elf(elf)
    assert len(packed) < len(elf) - 190 * page, "padding runs stay out of the file"
    lo, want = _memory_image(elf)
    got_lo, got = _memory_image(packed)
    assert (got_lo, len(got)) == (lo, len(want))
    pad = slice(4 * page, 68 * page)  # the int3 run (from the first whole page) reads as zeros
    assert want[pad] == b"\xcc" * (64 * page) and got[pad] == bytes(64 * page)
    want[pad] = bytes(64 * page)
    assert got == want, "apart from int3 padding, guest memory is byte for byte the same"
    assert struct.unpack_from("<Q", packed, 24)[0] == 0x1000000  # the entry point stays
    with pytest.raises(DriverError, match="PVH"):
        pack_pvh_elf(_elf([(1, 5, text, len(text))], struct.pack("<III", 4, 4, 1) + b"GNU\0" + bytes(4)))


def test_the_guest_kernel_is_a_packed_pvh_elf(image):
    import struct

    from pgfleet.drivers.microvm.kernel import _has_pvh_note

    elf = image.kernel.read_bytes()
    if image.kernel.name != "vmlinux":
        pytest.skip(f"PGFLEET_GUEST_KERNEL={image.kernel} is not a packed PVH vmlinux")
    assert elf[:4] == b"\x7fELF" and len(elf) == image.kernel_bytes <= 4 * 2**20
    phoff, = struct.unpack_from("<Q", elf, 32)
    phnum, = struct.unpack_from("<H", elf, 56)
    notes = [struct.unpack_from("<IIQQQQQQ", elf, phoff + 56 * i) for i in range(phnum)]
    assert any(_has_pvh_note(elf[off:off + size]) for t, _, off, _, _, size, _, _ in notes if t == 4)
