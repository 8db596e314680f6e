"""Template clusters: one `initdb` per (PostgreSQL version, configuration), cloned for every
new database. initdb costs ~350 ms and would dominate database creation; a copy does not.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from ..base import DriverError
from ..pgbin import PostgresInstall

#: the part of the configuration baked into every cluster; per-instance settings
#: (memory, socket directory) are given on the postgres command line instead
BASE_CONFIG = """
# pgfleet: a small, durable, socket-only cluster
listen_addresses = ''
max_connections = 100
shared_buffers = 16MB
huge_pages = off
dynamic_shared_memory_type = posix
fsync = on
synchronous_commit = on
full_page_writes = on
wal_level = minimal
max_wal_senders = 0
min_wal_size = 4MB
max_wal_size = 64MB
checkpoint_timeout = 5min
logging_collector = off
log_destination = 'stderr'
log_line_prefix = '%m [%p] '
log_min_messages = warning
log_connections = off
password_encryption = 'scram-sha-256'
temp_file_limit = 1GB
"""

TEMPLATE_FORMAT = 2  # bump when the template changes outside BASE_CONFIG (2: pg_hba reject)
TEMPLATE_OWNER = "postgres"  # Debian's postgres system user; initdb refuses root
WAL_SEGMENT_MB = 1  # small segments: an idle database's archive grows by 1 MiB, not 16
WAL_SEGMENT_BYTES = WAL_SEGMENT_MB << 20


def template_key(pg: PostgresInstall) -> str:
    digest = hashlib.sha256(f"{pg.version}\n{BASE_CONFIG}\n{TEMPLATE_FORMAT}".encode()).hexdigest()[:16]
    return f"pg{pg.major}-{digest}"


async def ensure_template(pg: PostgresInstall, templates_dir: Path) -> Path:
    """Path of a ready template data directory; builds it once (atomically) if missing."""
    final = templates_dir / template_key(pg)
    if (final / "PG_VERSION").exists():
        return final
    templates_dir.mkdir(parents=True, exist_ok=True)
    # A work directory of its own: two daemons (or test runs) may build the same template at
    # once on a fresh host; the first rename wins and the other build is thrown away.
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".building", dir=templates_dir))
    os.chmod(work, 0o700)
    shutil.chown(work, TEMPLATE_OWNER, TEMPLATE_OWNER)
    proc = await asyncio.create_subprocess_exec(
        "runuser", "-u", TEMPLATE_OWNER, "--", str(pg.initdb),
        "-D", str(work), "-U", "postgres", "--auth=trust", "--no-sync",
        f"--wal-segsize={WAL_SEGMENT_MB}", "--encoding=UTF8", "--locale=C.UTF-8",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        raise DriverError(f"initdb for the template failed: {out.decode(errors='replace').strip()[-500:]}")
    with open(work / "postgresql.conf", "a") as f:
        f.write(BASE_CONFIG)
    (work / "pg_hba.conf").write_text(
        "# pgfleet: never used. Every instance runs with hba_file and ident_file set on the\n"
        "# command line to root-owned files outside its (tenant-writable) data directory.\n"
        "local all all reject\n"
    )
    # initdb ran with --no-sync; one sync here makes the template durable before use
    sync = await asyncio.create_subprocess_exec("sync", "-f", str(work))
    await sync.wait()
    try:
        work.rename(final)
    except OSError:  # another build finished first (rename onto a non-empty directory)
        shutil.rmtree(work, ignore_errors=True)
        if not (final / "PG_VERSION").exists():
            raise
    return final
