"""Continuous archiving, base backups and recovery for sandbox databases.

Why not pgBackRest: archive_command runs as the tenant's uid inside its sandbox, so anything
it writes (a pgBackRest repository included) is the tenant's to rewrite or delete. Instead
Postgres' own `basic_archive` module (in postgresql-15, no fork per segment, fsync+rename)
archives each finished WAL segment into a spool directory *inside the data directory*
(`pgfleet_archive/`, a relative path, so it works in whatever mount view the sandbox has),
and the host moves it from there into the database's repository, which only root can write
(`<home>/backups/<uuid>/wal/`). The tenant can corrupt what it has not yet handed over, never
what is archived, and never another tenant's repository. Root reads the spool without
trusting it (names checked, no symlinks, no FIFOs, exact sizes: see safecopy).

Scale to zero leaves no gap: after the postmaster has stopped, the host copies the WAL written
since the last archived segment (the segment holding the shutdown checkpoint, kept as
`<segment>.partial` until the whole segment is archived).

Restores copy a base backup (or a live, consistent copy for a branch of "now"), stage the WAL
the recovery needs inside the new data directory (`pgfleet_restore_wal/`, owned by the new
database's uid: it never reads another database's repository) and start Postgres with
recovery settings on its command line, so nothing is left in its configuration afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..base import DriverError, RecoveryTarget
from . import safecopy
from .template import WAL_SEGMENT_BYTES

log = logging.getLogger(__name__)

SPOOL = "pgfleet_archive"
RESTORE_WAL = "pgfleet_restore_wal"
ARCHIVE_TIMEOUT_S = 60  # at most this much committed WAL waits in an unfinished segment while running
HISTORY_MAX_BYTES = 1 << 20
SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")
PARTIAL_RE = re.compile(r"^[0-9A-F]{24}\.partial$")
HISTORY_RE = re.compile(r"^[0-9A-F]{8}\.history$")
BACKUP_FILE_RE = re.compile(r"^[0-9A-F]{24}\.[0-9A-F]{8}\.backup$")
SEGMENTS_PER_XLOGID = 0x1_0000_0000 // WAL_SEGMENT_BYTES
#: a copied data directory is synced before its recovery: one syncfs, not an fsync of every
#: file of the merged overlay (the template layer's included: a second for a fresh database)
SYNC_AT_RECOVERY = ["-c", "recovery_init_sync_method=syncfs"]
RECOVERY_NOT_REACHED = "recovery ended before configured recovery target was reached"

#: left out of every copy of a data directory (as pg_basebackup leaves them out)
_EXCLUDED_FILES = {"postmaster.pid", "postmaster.opts", "backup_label", "tablespace_map",
                   "recovery.signal", "standby.signal", "backup_label.old"}
_EMPTIED_DIRS = {"pg_wal", "pg_replslot", "pg_dynshmem", "pg_notify", "pg_serial", "pg_snapshots",
                 "pg_stat_tmp", "pg_subtrans", SPOOL, RESTORE_WAL}


def postgres_args() -> list[str]:
    """Command-line settings that turn archiving on for every start (old templates included)."""
    return [
        "-c", "wal_level=replica",
        "-c", "archive_mode=on",
        "-c", "archive_library=basic_archive",
        "-c", f"basic_archive.archive_directory={SPOOL}",
        "-c", f"archive_timeout={ARCHIVE_TIMEOUT_S}",
    ]


def exclude_from_copy(path: str, is_dir: bool) -> bool:
    top, _, rest = path.partition("/")
    if not rest:
        return (not is_dir and top in _EXCLUDED_FILES) or top.startswith("pgsql_tmp")
    return top in _EMPTIED_DIRS or "pgsql_tmp" in path


def exclude_keeping_wal(path: str, is_dir: bool) -> bool:
    """For a cleanly stopped cluster copied to start as it is: its WAL is kept (not the
    archive status of the parent's segments)."""
    if path.startswith("pg_wal/"):
        return path.startswith("pg_wal/archive_status/")
    return exclude_from_copy(path, is_dir)


# --- the spool (tenant side) -> the repository (host side) ----------------------------
def prepare_spool(data: Path, uid: int) -> None:
    """Make `data/pgfleet_archive/` a directory owned by the tenant (replace anything else)."""
    dfd = safecopy.open_dir(data)
    try:
        try:
            st = os.stat(SPOOL, dir_fd=dfd, follow_symlinks=False)
            if (st.st_mode & 0o170000) != 0o040000:
                os.unlink(SPOOL, dir_fd=dfd)
                raise FileNotFoundError
        except FileNotFoundError:
            os.mkdir(SPOOL, 0o700, dir_fd=dfd)
        os.chown(SPOOL, uid, uid, dir_fd=dfd, follow_symlinks=False)
    finally:
        os.close(dfd)


def _wal_repo(repo: Path) -> int:
    wal = repo / "wal"
    wal.mkdir(mode=0o700, parents=True, exist_ok=True)
    return safecopy.open_dir(wal)


def _limit_for(name: str) -> int | None:
    if SEGMENT_RE.match(name):
        return WAL_SEGMENT_BYTES
    if HISTORY_RE.match(name) or BACKUP_FILE_RE.match(name):
        return HISTORY_MAX_BYTES
    return None


def ingest_spool(data: Path, repo: Path) -> int:
    """Move finished segments from the tenant's spool into the repository; returns how many."""
    try:
        dfd = safecopy.open_dir(data)
    except FileNotFoundError:
        return 0
    try:
        try:
            sfd = safecopy.open_dir(SPOOL, dfd)
        except (FileNotFoundError, NotADirectoryError, OSError):
            return 0
        rfd = _wal_repo(repo)
        moved = 0
        try:
            for name in sorted(os.listdir(sfd)):
                limit = _limit_for(name)
                if limit is None:
                    continue  # basic_archive's temporary files, or the tenant's junk
                try:
                    size = safecopy.copy_file(name, sfd, rfd, None, max_bytes=limit, overwrite=True, fsync=True)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    log.warning("%s: refusing archived file %s: %s", data, name, exc)
                    os.unlink(name, dir_fd=sfd)
                    continue
                if SEGMENT_RE.match(name) and size != WAL_SEGMENT_BYTES:
                    log.warning("%s: refusing short WAL segment %s (%d bytes)", data, name, size)
                    os.unlink(name, dir_fd=rfd)
                    os.unlink(name, dir_fd=sfd)
                    continue
                if SEGMENT_RE.match(name):
                    try:
                        os.unlink(f"{name}.partial", dir_fd=rfd)
                    except FileNotFoundError:
                        pass
                os.unlink(name, dir_fd=sfd)
                moved += 1
            if moved:
                os.fsync(rfd)
        finally:
            os.close(rfd)
            os.close(sfd)
    finally:
        os.close(dfd)
    return moved


@dataclass(frozen=True)
class ControlFacts:
    """What pg_control says about a stopped cluster."""

    checkpoint_lsn: int
    redo_lsn: int
    timeline: int
    time: float  # when that checkpoint was written


def read_control(data: Path) -> ControlFacts:
    """Parse global/pg_control (opened without trusting it; only fixed offsets are read)."""
    dfd = safecopy.open_dir(data)
    try:
        gfd = safecopy.open_dir("global", dfd)
        try:
            fd, _ = safecopy.open_regular("pg_control", gfd, max_bytes=8192)
        finally:
            os.close(gfd)
    finally:
        os.close(dfd)
    try:
        raw = os.read(fd, 64)
    finally:
        os.close(fd)
    if len(raw) < 56:
        raise DriverError(f"{data}: pg_control is truncated")
    # ControlFileData (PostgreSQL 15): system_identifier u64, pg_control_version u32,
    # catalog_version_no u32, state i32 (+pad), time i64, checkPoint u64, then
    # checkPointCopy: redo u64, ThisTimeLineID u32
    ctime, checkpoint, redo, tli = struct.unpack_from("<q Q Q I", raw, 24)
    return ControlFacts(checkpoint, redo, tli, float(ctime))


def segment_name(timeline: int, lsn: int) -> str:
    segno = lsn // WAL_SEGMENT_BYTES
    return f"{timeline:08X}{segno // SEGMENTS_PER_XLOGID:08X}{segno % SEGMENTS_PER_XLOGID:08X}"


def parse_lsn(text: str) -> int:
    hi, _, lo = text.strip().partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def ingest_after_stop(data: Path, repo: Path) -> int:
    """After a clean stop: archive what the spool holds, then the WAL the archiver never saw
    (up to the segment of the shutdown checkpoint, that one as `<segment>.partial`)."""
    moved = ingest_spool(data, repo)
    try:
        control = read_control(data)
    except (OSError, DriverError) as exc:
        log.warning("%s: cannot read pg_control after stop (%s); WAL tail not archived", data, exc)
        return moved
    return moved + archive_from_pg_wal(data, repo, segment_name(control.timeline, control.checkpoint_lsn),
                                       last_is_partial=True)


def archive_from_pg_wal(data: Path, repo: Path, last: str, last_is_partial: bool = False) -> int:
    """Copy the segments up to `last` (inclusive, same timeline) that the repository lacks,
    and the timeline history files, straight from pg_wal; `last_is_partial`: `last` is the
    unfinished segment of a stopped cluster, kept as `<last>.partial`. The archiver runs as
    the tenant, who can break it: a backup, a flush or a stop never waits on it, the host
    takes what it needs itself. Returns how many segments were copied."""
    dfd = safecopy.open_dir(data)
    try:
        wfd = safecopy.open_dir("pg_wal", dfd)
    finally:
        os.close(dfd)
    rfd = _wal_repo(repo)
    copied = 0
    try:
        have = set(os.listdir(rfd))
        newest = max((n for n in have if SEGMENT_RE.match(n) and n[:8] == last[:8]), default="")
        for name in sorted(os.listdir(wfd)):
            if HISTORY_RE.match(name) and name not in have:
                safecopy.copy_file(name, wfd, rfd, None, max_bytes=HISTORY_MAX_BYTES, overwrite=True, fsync=True)
            if not SEGMENT_RE.match(name) or name[:8] != last[:8] or name <= newest or name > last:
                continue
            target = f"{name}.partial" if last_is_partial and name == last else name
            safecopy.copy_file(name, wfd, rfd, None, max_bytes=WAL_SEGMENT_BYTES, dst_name=target,
                               overwrite=True, fsync=True)
            copied += 1
        have = set(os.listdir(rfd)) | ({f"{last}"} if last_is_partial else set())
        missing = _gaps(newest, last, have) if newest else []
        if missing:
            raise DriverError(f"{data}: WAL segments {missing[0]}..{missing[-1]} are neither archived nor in pg_wal")
        os.fsync(rfd)
    finally:
        os.close(rfd)
        os.close(wfd)
    return copied


def _gaps(after: str, last: str, have: set[str]) -> list[str]:
    return [n for n in _segment_range(after, last)[1:] if n not in have]


# --- base backups and restores ----------------------------------------------------------
def write_meta(path: Path, meta: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


def stage_wal(repo: Path, data: Path, start_segment: str, uid: int) -> int:
    """Copy the repository's WAL from `start_segment` on (every timeline, every history
    file) into `data/pgfleet_restore_wal/` for restore_command; returns the segment count."""
    staged = 0
    dfd = safecopy.open_dir(data)
    try:
        os.mkdir(RESTORE_WAL, 0o700, dir_fd=dfd)
        sfd = safecopy.open_dir(RESTORE_WAL, dfd)
        os.fchown(sfd, uid, uid)
    finally:
        os.close(dfd)
    try:
        wal = repo / "wal"
        if not wal.is_dir():
            return 0
        rfd = safecopy.open_dir(wal)
        try:
            names = set(os.listdir(rfd))
            for name in sorted(names):
                if HISTORY_RE.match(name):
                    safecopy.copy_file(name, rfd, sfd, uid)
                    continue
                seg = name.removesuffix(".partial")
                if not SEGMENT_RE.match(seg) or seg[8:] < start_segment[8:]:
                    continue
                if name.endswith(".partial") and seg in names:
                    continue  # the whole segment supersedes its partial copy
                safecopy.copy_file(name, rfd, sfd, uid, dst_name=seg)
                staged += 1
        finally:
            os.close(rfd)
    finally:
        os.close(sfd)
    return staged


def copy_backup_wal(src: Path, dest: Path, first: str, last: str, uid: int) -> int:
    """Give the online copy `dest` of `src` the WAL from its backup's start to its end
    (segments `first`..`last`, one timeline, and the timeline history files), straight from
    `src/pg_wal` (clones on a copy-on-write store) into `dest/pg_wal`, owned by `uid`: it then
    starts as it is, replaying them (nothing goes through the archive on this path).
    Returns how many segments were copied."""
    sfd = safecopy.open_dir(src)
    try:
        wfd = safecopy.open_dir("pg_wal", sfd)
    finally:
        os.close(sfd)
    dfd = safecopy.open_dir(dest)
    try:
        ofd = safecopy.open_dir("pg_wal", dfd)
    finally:
        os.close(dfd)
    copied = 0
    try:
        names = set(os.listdir(wfd))
        for name in sorted(names):
            if HISTORY_RE.match(name):
                safecopy.copy_file(name, wfd, ofd, uid, max_bytes=HISTORY_MAX_BYTES)
            elif SEGMENT_RE.match(name) and name[:8] == last[:8] and first[8:] <= name[8:] <= last[8:]:
                safecopy.copy_file(name, wfd, ofd, uid, max_bytes=WAL_SEGMENT_BYTES)
                copied += 1
        missing = [n for n in _segment_range(first, last) if n not in names]
        if missing:
            raise DriverError(f"{src}: WAL segments {missing[0]}..{missing[-1]} of the copy are no longer in pg_wal")
    finally:
        os.close(ofd)
        os.close(wfd)
    return copied


def _segment_range(first: str, last: str) -> list[str]:
    tli = int(last[:8], 16)
    first_no = int(first[8:16], 16) * SEGMENTS_PER_XLOGID + int(first[16:], 16)
    last_no = int(last[8:16], 16) * SEGMENTS_PER_XLOGID + int(last[16:], 16)
    return [f"{tli:08X}{n // SEGMENTS_PER_XLOGID:08X}{n % SEGMENTS_PER_XLOGID:08X}" for n in range(first_no, last_no + 1)]


def recovery_args(target: RecoveryTarget) -> list[str]:
    # hot_standby off: no session before the promotion, and postmaster.pid says "ready" only then
    args = ["-c", f"restore_command=cp {RESTORE_WAL}/%f %p", "-c", "recovery_target_action=promote",
            "-c", "recovery_target_timeline=latest", "-c", "hot_standby=off", *SYNC_AT_RECOVERY]
    if target.kind == "time":
        stamp = datetime.fromtimestamp(target.value, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f+00")
        args += ["-c", f"recovery_target_time={stamp}"]
    elif target.kind == "lsn":
        args += ["-c", f"recovery_target_lsn={format_lsn(int(target.value))}"]
    elif target.kind == "immediate":
        args += ["-c", "recovery_target=immediate"]
    return args


def label_start_segment(label: str) -> str:
    m = re.search(r"START WAL LOCATION: \S+ \(file ([0-9A-F]{24})\)", label)
    if m is None:
        raise DriverError("pg_backup_stop returned a backup label without a start location")
    return m.group(1)

