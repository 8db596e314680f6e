"""The unmodified npm package @neondatabase/serverless (pinned in tests/edge/node/package-lock.json)
against pgfleet's HTTP/WebSocket listener: neon() over HTTP compared with psql's answers to the
same queries, transactions, errors, Pool and Client over WebSocket, waking, bad credentials."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from pgfleet.drivers.pgbin import find_postgres

NODE_DIR = Path(__file__).resolve().parent / "node"

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(300), pytest.mark.skipif(
    shutil.which("node") is None or not (NODE_DIR / "node_modules" / "@neondatabase" / "serverless").is_dir(),
    reason="SKIPPED LOUDLY: node or tests/edge/node/node_modules missing: run scripts/install-deps.sh")]

# (query with parameters for the driver, its parameters (JSON; $date/$hex become Date/Buffer),
#  the same query with literals for psql)
QUERIES = [
    ("SELECT $1::int, $2::bigint, $3::float8, $4::numeric", [42, "9007199254740993", 2.5, "12345.678901234567890"],
     "SELECT 42::int, 9007199254740993::bigint, 2.5::float8, 12345.678901234567890::numeric"),
    ("SELECT $1::text, $2::text, $3::text", ["héllo wörld ✓", "it's \"quoted\" \\ ok", ""],
     "SELECT 'héllo wörld ✓'::text, 'it''s \"quoted\" \\ ok'::text, ''::text"),
    ("SELECT $1::bool, $2::bool, $3::int", [True, False, None], "SELECT true, false, NULL::int"),
    ("SELECT $1::timestamptz", [{"$date": "2024-02-29T12:34:56.789Z"}], "SELECT '2024-02-29T12:34:56.789Z'::timestamptz"),
    ("SELECT $1::bytea", [{"$hex": "00ff10"}], "SELECT '\\x00ff10'::bytea"),
    ("SELECT $1::int[], $2::text[]", [[1, 2, 3], ["a", "b c", None]], "SELECT ARRAY[1,2,3], ARRAY['a','b c',NULL]"),
    ("SELECT $1::jsonb", [{"a": [1, {"b": None}], "c": "é"}], "SELECT '{\"a\": [1, {\"b\": null}], \"c\": \"é\"}'::jsonb"),
    ("SELECT $1::date, $2::interval, $3::uuid", ["2024-01-02", "1 day 02:03:04", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"],
     "SELECT '2024-01-02'::date, '1 day 02:03:04'::interval, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid"),
    ("SELECT x, x * $1 FROM generate_series(1, 3) AS x", [10], "SELECT x, x * 10 FROM generate_series(1, 3) AS x"),
]


async def run(args: list[str], env: dict, cwd: Path | None = None) -> str:
    """A client process, awaited (the servers it talks to run on this test's event loop)."""
    proc = await asyncio.create_subprocess_exec(*args, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 240)
    except asyncio.TimeoutError:
        proc.kill()
        raise
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def run_node(edge, url: str, mode: str = "all") -> dict:
    env = dict(os.environ, EDGE_PORT=str(edge.port), DB_URL=url, MODE=mode, TZ="UTC",
               QUERIES=json.dumps([{"sql": s, "params": p} for s, p, _ in QUERIES]))
    return json.loads(await run(["node", str(NODE_DIR / "run.js")], env, NODE_DIR))


async def psql_rows(env, name: str, password: str, sql: str) -> list[list[str | None]]:
    psql = str(find_postgres().bindir / "psql")
    out = await run(
        [psql, "-X", "-A", "-t", "-F", "\x1f", "-R", "\x1e", "-P", "null=\x01", "-c", sql],
        dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(env.proxy.port), PGUSER=name, PGDATABASE=name,
             PGPASSWORD=password, PGSSLMODE="disable"))
    return [[None if v == "\x01" else v for v in line.split("\x1f")] for line in out.rstrip("\n").split("\x1e") if line]


def url_of(name: str, password: str, db: str | None = None) -> str:
    return f"postgresql://{name}:{password}@{name}.db.localhost/{db or name}"


async def test_neon_driver_http_and_websocket(edge, db, env):
    name, password = db
    out = await run_node(edge, url_of(name, password))
    http, ws = out["http"], out["ws"]
    for (sql, _, literal), rows in zip(QUERIES, http["typed"]):
        assert rows == await psql_rows(env, name, password, literal), sql
    assert http["parsed"] == {"i": 42, "t": "héllo", "b": True, "n": None, "a": [1, 2, 3], "j": {"k": "v"}, "f": 1.5}
    assert http["tagged"] == [{"xy": "xy"}]
    assert http["commit"][2] == [{"n": 2}]
    assert http["rollback"]["error"]["code"] == "23505"
    assert http["after_rollback"] == [{"id": 1}, {"id": 2}]
    assert http["read_only"]["error"]["code"] == "25006"
    assert http["syntax"]["error"]["code"] == "42601" and http["syntax"]["error"]["position"] == "12"
    assert http["full"] == {"command": "SELECT", "rowCount": 2, "rows": [{"id": 1, "note": "one"}, {"id": 2, "note": "two"}],
                            "fields": [["id", 23], ["note", 25]]}
    assert ws["client"][0]["d"] == 42 and "neondatabase/serverless" in ws["client"][0]["app"]  # its startup packet
    assert ws["notify"] == "hello"
    assert ws["scram"] == [{"seven": 7}]
    assert ws["pool"] == [i * i for i in range(12)]
    assert ws["pool_tx"] == [{"note": "ws"}]


async def test_neon_driver_wakes_a_standby_database_over_http(edge, db, env):
    name, password = db
    await env.fleet.suspend(name)
    assert env.fleet.get(name).state == "standby"
    assert await run_node(edge, url_of(name, password), "one") == {"ok": [{"one": 1}]}
    assert env.fleet.get(name).state == "running"


async def test_neon_driver_bad_credentials_and_unknown_database(edge, db):
    name, password = db
    bad = await run_node(edge, url_of(name, "wrong"), "one")
    assert bad["error"]["code"] == "28P01"
    unknown = await run_node(edge, f"postgresql://{name}:{password}@127.0.0.1/nosuchdb", "one")
    assert unknown["error"]["code"] == "3D000"
    bad_ws = await run_node(edge, url_of(name, "wrong"), "ws-one")
    assert bad_ws["error"]["code"] == "28P01"
