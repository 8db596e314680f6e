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
    register_user(old, "some-uuid", home)
    assert prune_images(cache) == [], "an image an instance still needs must be kept"
    shutil.rmtree(home)  # the instance is gone (its reference is stale)
    assert prune_images(cache, dry_run=True) == [old_dir] and old_dir.exists()
    assert prune_images(cache) == [old_dir] and not old_dir.exists()
