"""Who an instance's processes are: its host-wide uid (uids.py, recorded in its home) and the
root-owned authentication files that let only host root log in. A mixin of SandboxDriver.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..base import DriverError, InstanceSpec
from ..untrusted import write_root_file


class SandboxIdentity:
    """Methods of SandboxDriver."""

    def auth_dir(self, spec: InstanceSpec) -> Path:
        """Root-owned pg_hba.conf / pg_ident.conf, outside the tenant-writable data directory."""
        return spec.home / "auth"

    def uid_of(self, spec: InstanceSpec) -> int:
        """The instance's uid (and gid): allocated host-wide (uids.py) the first time it is
        asked for, recorded in its home. An instance made before that record keeps the uid
        its files have (and has it registered)."""
        uid = self._uids.get(spec.uuid)
        if uid is not None:
            return uid
        record = spec.home / "uid"
        try:
            uid = int(record.read_text())
        except FileNotFoundError:
            uid = self._legacy_uid(spec)
            try:
                if uid is not None:
                    self.uids.claim(uid, spec.home)
                else:
                    # the home exists first: the registry takes an entry whose home is
                    # missing for a stale one
                    spec.home.mkdir(parents=True, exist_ok=True)
                    os.chmod(spec.home, 0o700)
                    uid = self.uids.allocate(spec.home)
            except RuntimeError as exc:
                raise DriverError(str(exc)) from None
            write_root_file(record, f"{uid}\n")
        self._uids[spec.uuid] = uid
        return uid

    def _legacy_uid(self, spec: InstanceSpec) -> int | None:
        """The owner of an existing instance's files (its overlay's upper directory, or its
        data directory), from before uids were recorded."""
        for path in (spec.home / "upper", self.data_dir(spec)):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if st.st_uid != 0:
                return st.st_uid
        return None

    def _write_auth_files(self, spec: InstanceSpec) -> list[str]:
        """Who may log in over the instance's socket: host root only (the daemon: admin
        work as postgres, the proxy as the tenant's role), by peer credentials. The
        instance's own uid has no passwd entry, so peer authentication refuses it whatever
        role it asks for: code running as the tenant cannot log in as a superuser.
        Returns the postgres options that point at these files."""
        d = self.auth_dir(spec)
        d.mkdir(mode=0o755, exist_ok=True)
        files = {
            "pg_hba.conf": "# pgfleet: only host root, by peer credentials (see pg_ident.conf)\n"
                           "local all all peer map=pgfleet\n",
            "pg_ident.conf": "# MAPNAME SYSTEM-USERNAME PG-USERNAME\n"
                             f"pgfleet root postgres\npgfleet root {_hba_token(spec.role)}\n",
        }
        for name, text in files.items():
            path = d / name
            try:
                if path.read_text() == text:
                    continue
            except FileNotFoundError:
                pass
            tmp = d / f".{name}.tmp"
            tmp.write_text(text)
            os.chmod(tmp, 0o644)
            tmp.rename(path)
        return ["-c", f"hba_file={d / 'pg_hba.conf'}", "-c", f"ident_file={d / 'pg_ident.conf'}"]


def _hba_token(role: str) -> str:
    """A role name as one pg_ident.conf token (names are DNS labels; refuse anything else)."""
    if not role or any(not (c.isalnum() or c in "-_") for c in role):
        raise DriverError(f"role name {role!r} cannot be written into pg_ident.conf")
    return role

