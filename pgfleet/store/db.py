"""Persistent state: one SQLite database under the pgfleet home.

Every instance transition is committed here *before* the fleet acts on it (WAL mode,
synchronous=FULL), so a daemon crash at any point leaves a row that says what was
being attempted and recovery can finish or undo it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

from pgfleet import settings as S

SCHEMA_VERSION = 1

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS instances (
    uuid            TEXT PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    slot            INTEGER NOT NULL UNIQUE,
    state           TEXT NOT NULL,
    driver          TEXT NOT NULL,
    image           TEXT NOT NULL,
    memory_mb       INTEGER NOT NULL,
    vcpus           INTEGER NOT NULL DEFAULT 1,
    role            TEXT NOT NULL,
    verifier        TEXT NOT NULL,
    stz_policy      TEXT NOT NULL,
    cooldown_ms     INTEGER NOT NULL,
    provisioned     INTEGER NOT NULL DEFAULT 0,
    deleting        INTEGER NOT NULL DEFAULT 0,
    created_at      REAL NOT NULL,
    started_at      REAL,
    stopped_at      REAL,
    start_count     INTEGER NOT NULL DEFAULT 0,
    stop_reason     TEXT,
    boot_time_us    INTEGER,
    tags            TEXT NOT NULL DEFAULT '{{}}',
    pool_size       INTEGER NOT NULL DEFAULT {S.POOL_SIZE.default},
    max_pooled_clients INTEGER NOT NULL DEFAULT {S.MAX_POOLED_CLIENTS.default},
    max_direct_clients INTEGER NOT NULL DEFAULT {S.MAX_DIRECT_CLIENTS.default},
    require_tls     INTEGER NOT NULL DEFAULT 0,
    standby_tier    TEXT DEFAULT NULL,
    cold_after_ms   INTEGER NOT NULL DEFAULT {S.COLD_AFTER_MS.default},
    disk_mb         INTEGER NOT NULL DEFAULT {S.DISK_MB.default},
    cpu_pct         INTEGER NOT NULL DEFAULT {S.CPU_PCT.default}
);
CREATE TABLE IF NOT EXISTS transitions (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid        TEXT NOT NULL,
    at          REAL NOT NULL,
    from_state  TEXT,
    to_state    TEXT NOT NULL,
    reason      TEXT
);
CREATE INDEX IF NOT EXISTS transitions_uuid ON transitions(uuid, id);
-- the quotas' live count on every start and create, and db list --state: no scan of every row
CREATE INDEX IF NOT EXISTS instances_state ON instances(state);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class InstanceRow:
    uuid: str
    name: str
    slot: int
    state: str
    driver: str
    image: str
    memory_mb: int
    role: str
    verifier: str
    stz_policy: str
    cooldown_ms: int
    created_at: float
    vcpus: int = 1
    provisioned: int = 0
    deleting: int = 0
    started_at: float | None = None
    stopped_at: float | None = None
    start_count: int = 0
    stop_reason: str | None = None
    boot_time_us: int | None = None
    tags: dict[str, Any] = field(default_factory=dict)
    pool_size: int = S.POOL_SIZE.default
    max_pooled_clients: int = S.MAX_POOLED_CLIENTS.default
    max_direct_clients: int = S.MAX_DIRECT_CLIENTS.default
    require_tls: int = 0
    #: in standby: "warm" (processes frozen, memory reclaimed) or "cold" (stopped)
    standby_tier: str | None = None
    #: how long a database stays warm before it goes cold
    cold_after_ms: int = S.COLD_AFTER_MS.default
    disk_mb: int = S.DISK_MB.default  # 0: no disk limit of its own
    cpu_pct: int = S.CPU_PCT.default  # CPU cap in percent of one CPU; 0: none

    @classmethod
    def from_sql(cls, row: sqlite3.Row) -> "InstanceRow":
        data = dict(row)
        data["tags"] = json.loads(data.get("tags") or "{}")
        return cls(**data)


_COLUMNS = [f.name for f in fields(InstanceRow)]


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(_SCHEMA)
        self._add_missing_columns()
        self.db.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )

    def close(self) -> None:
        self.db.close()

    def _add_missing_columns(self) -> None:
        """Homes made by an older pgfleet get the columns added since, with their defaults."""
        have = {r[1] for r in self.db.execute("PRAGMA table_info(instances)")}
        for line in _SCHEMA.split("CREATE TABLE IF NOT EXISTS instances (", 1)[1].split(");", 1)[0].splitlines():
            words = line.strip().rstrip(",").split()
            if len(words) >= 2 and words[0] not in have and "DEFAULT" in words:
                self.db.execute(f"ALTER TABLE instances ADD COLUMN {' '.join(words)}")

    # --- instances --------------------------------------------------------------
    def insert(self, row: InstanceRow) -> None:
        data = asdict(row)
        data["tags"] = json.dumps(row.tags)
        cols = ",".join(_COLUMNS)
        marks = ",".join("?" for _ in _COLUMNS)
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(f"INSERT INTO instances({cols}) VALUES ({marks})", [data[c] for c in _COLUMNS])
            self._log(row.uuid, None, row.state, "created")

    def get(self, uuid: str) -> InstanceRow | None:
        r = self.db.execute("SELECT * FROM instances WHERE uuid=?", (uuid,)).fetchone()
        return InstanceRow.from_sql(r) if r else None

    def by_name(self, name: str) -> InstanceRow | None:
        r = self.db.execute("SELECT * FROM instances WHERE name=?", (name,)).fetchone()
        return InstanceRow.from_sql(r) if r else None

    def all(self) -> list[InstanceRow]:
        return self._rows("SELECT * FROM instances ORDER BY created_at, name", ())

    def with_processes(self) -> list[InstanceRow]:
        """Running and warm instances (the ones that hold memory): one indexed query, not
        every row (a host with 10,000 databases in cold standby reads none of them)."""
        return self._rows("SELECT * FROM instances WHERE state = 'running' "
                          "OR (state = 'standby' AND standby_tier = 'warm')", ())

    def page(self, *, limit: int | None = None, after: str | None = None,
             state: str | None = None) -> list[InstanceRow]:
        """Instances by name, `limit` at most, those named after `after` (a cursor), only in
        `state` if given ("deleting" selects those being deleted): one indexed query, so a
        page costs the same with 10 databases or 10,000."""
        where, args = [], []
        if after is not None:
            where.append("name > ?")
            args.append(after)
        if state == "deleting":
            where.append("deleting = 1")
        elif state is not None:
            where.append("state = ? AND deleting = 0")
            args.append(state)
        sql = "SELECT * FROM instances" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY name"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return self._rows(sql, args)

    def _rows(self, sql: str, args) -> list[InstanceRow]:
        """Many rows at once: plain tuples zipped with the column names found once (sqlite3.Row
        and a JSON parse of empty tags per row cost ~3x more at 10,000 rows)."""
        cur = self.db.cursor()
        cur.row_factory = None
        cur.execute(sql, args)
        names = [d[0] for d in cur.description]
        tags_at = names.index("tags")
        out = []
        for values in cur:
            data = dict(zip(names, values))
            tags = values[tags_at]
            data["tags"] = json.loads(tags) if tags and tags != "{}" else {}
            out.append(InstanceRow(**data))
        return out

    def count_by_state(self) -> dict[str, int]:
        """How many instances are in each state (those being deleted count as "deleting")."""
        rows = self.db.execute(
            "SELECT CASE WHEN deleting THEN 'deleting' ELSE state END AS s, count(*) FROM instances GROUP BY s"
        )
        return {state: n for state, n in rows}

    def live_usage(self, live_states: Iterable[str]) -> dict[str, int]:
        """Count, memory and vCPUs of the instances in `live_states`, summed by SQLite."""
        live = list(live_states)
        marks = ",".join("?" for _ in live)
        total, count, memory, vcpus = self.db.execute(
            f"SELECT (SELECT count(*) FROM instances), count(*), coalesce(sum(memory_mb), 0), "
            f"coalesce(sum(vcpus), 0) FROM instances WHERE state IN ({marks})", live,
        ).fetchone()
        return {"instances": total, "live_instances": count, "live_memory_mb": memory, "live_vcpus": vcpus}

    def update(self, uuid: str, **changes: Any) -> None:
        if not changes:
            return
        if "tags" in changes:
            changes["tags"] = json.dumps(changes["tags"])
        sets = ",".join(f"{k}=?" for k in changes)
        with self.db:
            self.db.execute(f"UPDATE instances SET {sets} WHERE uuid=?", [*changes.values(), uuid])

    def transition(self, uuid: str, from_state: str, to_state: str, reason: str | None = None,
                   durable: bool = True, **changes: Any) -> None:
        """Atomically move uuid from `from_state` to `to_state` (and apply `changes`).

        `durable=False` commits without waiting for the disk (it survives a crash of the
        daemon, not of the host): only for records a host crash makes moot anyway, such as
        a warm database's thaw (after a host crash there are no processes to be warm)."""
        if "tags" in changes:
            changes["tags"] = json.dumps(changes["tags"])
        sets = ",".join(["state=?", *(f"{k}=?" for k in changes)])
        if not durable:
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: no fsync at commit
        try:
            self._transition(uuid, from_state, to_state, reason, sets, changes)
        finally:
            if not durable:
                self.db.execute("PRAGMA synchronous=FULL")

    def _transition(self, uuid: str, from_state: str, to_state: str, reason: str | None, sets: str,
                    changes: dict[str, Any]) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            cur = self.db.execute(
                f"UPDATE instances SET {sets} WHERE uuid=? AND state=?",
                [to_state, *changes.values(), uuid, from_state],
            )
            if cur.rowcount != 1:
                raise StaleTransition(uuid, from_state, to_state)
            self._log(uuid, from_state, to_state, reason)

    def delete(self, uuid: str) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM instances WHERE uuid=?", (uuid,))
            self._log(uuid, None, "deleted", None)

    def used_slots(self) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT slot FROM instances")}

    def history(self, uuid: str, limit: int = 100) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT at, from_state, to_state, reason FROM transitions WHERE uuid=? ORDER BY id DESC LIMIT ?",
            (uuid, limit),
        )
        return [dict(r) for r in rows]

    def _log(self, uuid: str, from_state: str | None, to_state: str, reason: str | None) -> None:
        self.db.execute(
            "INSERT INTO transitions(uuid, at, from_state, to_state, reason) VALUES (?,?,?,?,?)",
            (uuid, time.time(), from_state, to_state, reason),
        )


class StaleTransition(RuntimeError):
    def __init__(self, uuid: str, from_state: str, to_state: str) -> None:
        super().__init__(f"instance {uuid} is no longer {from_state}; cannot move it to {to_state}")


