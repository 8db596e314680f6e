"""The guest init's control answers become typed errors (no exception text is matched)."""

from __future__ import annotations

import pytest

from pgfleet.drivers.microvm.guest import GuestCommandError, GuestControl, NoAdminSession, sql_command


@pytest.mark.parametrize("command, answer, error", [
    (b"R", b"ok\n", None),
    (sql_command("SELECT 1"), b"err no admin session\n", NoAdminSession),
    (b"A", b"err admin session: startup failed\n", NoAdminSession),
    (sql_command("SELECT 1"), b"err admin session lost\n", NoAdminSession),
    (sql_command("SELECT 1"), b"err syntax error at or near x\n", GuestCommandError),
    (b"H", b"err cannot halt\n", GuestCommandError),
])
def test_answers(command, answer, error):
    if error is None:
        GuestControl._check([command], [answer])
        return
    with pytest.raises(error) as info:
        GuestControl._check([command], [answer])
    assert type(info.value) is error
    assert answer.decode().strip() in str(info.value)


def test_sql_command_frames_its_length():
    assert sql_command("SELECT 1") == b"Q\x08\x00\x00\x00SELECT 1"
