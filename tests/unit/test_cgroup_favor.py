"""cgroups.favor_migrations: which mount it would remount, and with which options (the remount
itself is exercised by every sandbox test run as root; here, the mount table cases)."""

from __future__ import annotations

from pgfleet.drivers import cgroups


def test_already_on_is_left_alone(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate,favordynmods 0 0\n")
    assert "already on" in cgroups.favor_migrations(mounts)


def test_no_cgroup2_mount_is_said(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n")
    assert cgroups.favor_migrations(mounts).startswith("no cgroup2 mount")
