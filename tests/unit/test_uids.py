"""The host-wide uid registry's order of allocation (no processes started: the fast layer)."""

from __future__ import annotations

from pgfleet.drivers.sandbox.uids import UID_FIRST, UidRegistry


def _homes(tmp_path, n):
    homes = [tmp_path / f"home{i}" for i in range(n)]
    for h in homes:
        h.mkdir()
    return homes


def test_fresh_uids_count_on_from_the_last_given(tmp_path):
    reg = UidRegistry(tmp_path / "registry")
    a, b, c = _homes(tmp_path, 3)
    ua, ub = reg.allocate(a), reg.allocate(b)
    assert ub > ua >= UID_FIRST
    reg.release(ua, a)
    assert reg.allocate(c) > ub, "a released uid is not given again while fresh ones remain"


def test_an_owner_gets_its_uid_back(tmp_path):
    reg = UidRegistry(tmp_path / "registry")
    (a,) = _homes(tmp_path, 1)
    assert reg.allocate(a) == reg.allocate(a)


def test_a_lost_hint_falls_back_to_the_listing(tmp_path):
    reg = UidRegistry(tmp_path / "registry")
    a, b, c = _homes(tmp_path, 3)
    ua, ub = reg.allocate(a), reg.allocate(b)
    (tmp_path / "registry" / ".next").write_text("garbage")
    assert reg.allocate(c) > ub
