"""WAL segment names: the ranges a backup's copy needs and the gaps of an archive."""

from __future__ import annotations

from pgfleet.drivers.sandbox.archive import SEGMENTS_PER_XLOGID, _gaps, _segment_range, segment_name
from pgfleet.drivers.sandbox.template import WAL_SEGMENT_BYTES


def test_a_range_crosses_the_log_id_boundary():
    last_of_log0 = segment_name(1, (SEGMENTS_PER_XLOGID - 1) * WAL_SEGMENT_BYTES)
    first_of_log1 = segment_name(1, SEGMENTS_PER_XLOGID * WAL_SEGMENT_BYTES)
    assert first_of_log1 == "000000010000000100000000"
    assert _segment_range(last_of_log0, first_of_log1) == [last_of_log0, first_of_log1]


def test_a_range_of_one_and_its_timeline():
    assert _segment_range("00000002000000000000000A", "00000002000000000000000A") == ["00000002000000000000000A"]


def test_gaps_are_after_the_newest_archived_up_to_the_last():
    have = {"000000010000000000000003", "000000010000000000000005"}
    assert _gaps("000000010000000000000002", "000000010000000000000005", have) == ["000000010000000000000004"]
    assert _gaps("000000010000000000000005", "000000010000000000000005", have) == []
