"""SQL over HTTP (Neon's protocol) with a real HTTP client against real Postgres."""

from __future__ import annotations

import ssl

import httpx
import pytest

from tests.polling import until

from .conftest import neon_headers

pytestmark = pytest.mark.asyncio


def url(edge) -> str:
    return f"http://127.0.0.1:{edge.port}/sql"


async def post(edge, body, headers) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as client:
        return await client.post(url(edge), json=body, headers=headers)


async def test_query_with_parameters_raw_text_array_mode(edge, db):
    name, password = db
    r = await post(edge, {"query": "SELECT $1::int + 1 AS n, $2::text AS t, $3::bool AS b, $4::int AS nothing",
                          "params": [41, "hé", True, None]}, neon_headers(name, password))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["command"] == "SELECT" and doc["rowCount"] == 1 and doc["rowAsArray"] is True
    assert doc["rows"] == [["42", "hé", "t", None]]
    assert [f["name"] for f in doc["fields"]] == ["n", "t", "b", "nothing"]
    assert [f["dataTypeID"] for f in doc["fields"]] == [23, 25, 16, 23]
    assert doc["fields"][0]["format"] == "text" and doc["fields"][0]["dataTypeSize"] == 4
    assert r.headers["access-control-allow-origin"] == "*"


async def test_typed_json_values_and_object_rows_without_raw_text(edge, db):
    name, password = db
    headers = {"Neon-Connection-String": neon_headers(name, password)["Neon-Connection-String"]}
    r = await post(edge, {"query": "SELECT 1::int8 AS a, 2.5::float8 AS b, true AS c, '{\"k\": [1]}'::jsonb AS d, "
                                   "ARRAY[1, NULL, 3] AS e, 'x' AS f, 1.10::numeric AS g"}, headers)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["rowAsArray"] is False
    assert doc["rows"] == [{"a": 1, "b": 2.5, "c": True, "d": {"k": [1]}, "e": [1, None, 3], "f": "x", "g": "1.10"}]


async def test_array_mode_per_query_overrides_the_header(edge, db):
    name, password = db
    r = await post(edge, {"query": "SELECT 1 AS one", "arrayMode": False}, neon_headers(name, password))
    assert r.json()["rows"] == [{"one": "1"}]


async def test_array_and_json_parameters(edge, db):
    name, password = db
    r = await post(edge, {"query": "SELECT $1::int[] AS a, $2::text[] AS b, $3::jsonb->>'k' AS c",
                          "params": [[1, 2, None], ["a,b", 'q"t', None], {"k": "v"}]}, neon_headers(name, password))
    assert r.status_code == 200, r.text
    assert r.json()["rows"] == [["{1,2,NULL}", '{"a,b","q\\"t",NULL}', "v"]]


async def test_row_counts_from_command_tags(edge, db):
    name, password = db
    h = neon_headers(name, password)
    r = await post(edge, {"query": "CREATE TABLE t (x int)"}, h)
    assert (r.json()["command"], r.json()["rowCount"]) == ("CREATE", None)
    r = await post(edge, {"query": "INSERT INTO t SELECT generate_series(1, 3)"}, h)
    assert (r.json()["command"], r.json()["rowCount"]) == ("INSERT", 3)
    r = await post(edge, {"query": "UPDATE t SET x = x + 1 WHERE x > 1"}, h)
    assert (r.json()["command"], r.json()["rowCount"]) == ("UPDATE", 2)


async def test_batch_commits_in_one_transaction(edge, db):
    name, password = db
    h = neon_headers(name, password)
    await post(edge, {"query": "CREATE TABLE b (x int)"}, h)
    r = await post(edge, {"queries": [{"query": "INSERT INTO b VALUES ($1)", "params": [1]},
                                      {"query": "INSERT INTO b VALUES ($1)", "params": [2]},
                                      {"query": "SELECT count(*) FROM b"}]}, h)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["command"] for x in results] == ["INSERT", "INSERT", "SELECT"]
    assert results[2]["rows"] == [["2"]]


async def test_batch_rolls_back_on_error(edge, db):
    name, password = db
    h = neon_headers(name, password)
    await post(edge, {"query": "CREATE TABLE rb (x int PRIMARY KEY)"}, h)
    r = await post(edge, {"queries": [{"query": "INSERT INTO rb VALUES (1)"},
                                      {"query": "INSERT INTO rb VALUES (1)"}]}, h)
    assert r.status_code == 400
    assert r.json()["code"] == "23505" and r.json()["constraint"] == "rb_pkey"
    r = await post(edge, {"query": "SELECT count(*) FROM rb"}, h)
    assert r.json()["rows"] == [["0"]]


async def test_batch_isolation_read_only_deferrable(edge, db):
    name, password = db
    h = neon_headers(name, password, **{"Neon-Batch-Isolation-Level": "Serializable",
                                        "Neon-Batch-Read-Only": "true", "Neon-Batch-Deferrable": "true"})
    r = await post(edge, {"queries": [{"query": "SELECT current_setting('transaction_isolation'), "
                                                "current_setting('transaction_read_only'), "
                                                "current_setting('transaction_deferrable')"}]}, h)
    assert r.json()["results"][0]["rows"] == [["serializable", "on", "on"]]
    r = await post(edge, {"queries": [{"query": "CREATE TABLE nope (x int)"}]}, h)
    assert r.status_code == 400 and r.json()["code"] == "25006"
    bad = neon_headers(name, password, **{"Neon-Batch-Isolation-Level": "Chaos"})
    r = await post(edge, {"queries": [{"query": "SELECT 1"}]}, bad)
    assert r.status_code == 400 and "Neon-Batch-Isolation-Level" in r.json()["message"]


async def test_error_has_code_and_position(edge, db):
    name, password = db
    r = await post(edge, {"query": "SELECT 1 + FROM nowhere"}, neon_headers(name, password))
    assert r.status_code == 400
    doc = r.json()
    assert doc["code"] == "42601" and doc["position"] == "12" and doc["severity"] == "ERROR"
    assert "syntax error" in doc["message"] and "hint" in doc and "routine" in doc


async def test_bad_password_unknown_database_missing_header(edge, db):
    name, password = db
    r = await post(edge, {"query": "SELECT 1"}, neon_headers(name, password + "x"))
    assert r.status_code == 400 and r.json()["code"] == "28P01"
    assert sum(edge.pooled.stats.auth_failures_by_db.values()) == 1  # counted as the proxy counts logins
    r = await post(edge, {"query": "SELECT 1"}, neon_headers("nosuchdb", password))
    assert r.status_code == 400 and r.json()["code"] == "3D000"
    r = await post(edge, {"query": "SELECT 1"}, {})
    assert r.status_code == 400 and "Neon-Connection-String" in r.json()["message"]


async def test_routing_by_host_name(edge, db):
    name, password = db
    h = {"Neon-Connection-String": f"postgresql://{name}:{password}@{name}.db.localhost/postgres"}
    # the database "postgres" does not exist: the host name routes, to the database named after it
    r = await post(edge, {"query": "SELECT 1 AS one, current_database() AS db"}, h)
    assert r.status_code == 200, r.text
    assert r.json()["rows"] == [{"one": 1, "db": name}]


async def test_cors_preflight(edge):
    async with httpx.AsyncClient() as client:
        r = await client.options(url(edge), headers={"Origin": "https://app.example",
                                                     "Access-Control-Request-Method": "POST"})
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "*"
    assert "Neon-Connection-String" in r.headers["access-control-allow-headers"]


async def test_standby_database_is_woken_by_a_query(edge, db, env):
    name, password = db
    await env.fleet.suspend(name)
    assert env.fleet.get(name).state == "standby"
    r = await post(edge, {"query": "SELECT 1"}, neon_headers(name, password))
    assert r.status_code == 200 and r.json()["rows"] == [["1"]]
    assert env.fleet.get(name).state == "running"


async def test_size_limits_are_clear_errors(edge, db):
    name, password = db
    h = neon_headers(name, password)
    r = await post(edge, {"query": "SELECT $1", "params": ["x" * 70_000]}, h)
    assert r.status_code == 413 and "limit" in r.json()["message"]
    r = await post(edge, {"query": "SELECT repeat('x', 1000) FROM generate_series(1, 1000)"}, h)
    assert r.status_code == 507 and "limit" in r.json()["message"]
    r = await post(edge, {"query": "SELECT 2"}, h)  # the connection was discarded, the next one works
    assert r.json()["rows"] == [["2"]]


async def test_session_changes_do_not_leak_to_the_next_request(edge, db):
    name, password = db
    h = neon_headers(name, password)
    r = await post(edge, {"query": "SET search_path = nowhere"}, h)
    assert r.status_code == 200
    r = await post(edge, {"query": "SHOW search_path"}, h)
    assert r.json()["rows"] == [['"$user", public']]
    r = await post(edge, {"query": "BEGIN"}, h)  # a transaction left open is not reused either
    r = await post(edge, {"query": "SAVEPOINT s"}, h)
    assert r.status_code == 400 and r.json()["code"] == "25P01"  # no transaction block: a fresh connection


async def test_bad_bodies_are_400(edge, db):
    name, password = db
    h = neon_headers(name, password)
    async with httpx.AsyncClient() as client:
        for body in (b"not json", b"[]", b'{"query": 1}', b'{"query": "SELECT 1", "params": 3}',
                     b'{"queries": {}}', b'{"query": "SELECT \\u0000"}'):
            r = await client.post(url(edge), content=body, headers=h)
            assert r.status_code == 400, body
            assert r.json()["message"]


async def test_password_checks_are_cached(edge, db, env):
    name, password = db
    h = neon_headers(name, password)
    for _ in range(5):
        assert (await post(edge, {"query": "SELECT 1"}, h)).status_code == 200
    assert edge.passwords.checks == 1
    # a cached success never lets another password in, nor the old one once rotated
    r = await post(edge, {"query": "SELECT 1"}, neon_headers(name, password[:-1]))
    assert r.status_code == 400 and r.json()["code"] == "28P01"
    _, rotated = await env.fleet.rotate_password(name)
    r = await post(edge, {"query": "SELECT 1"}, h)
    assert r.status_code == 400 and r.json()["code"] == "28P01"
    assert (await post(edge, {"query": "SELECT 1"}, neon_headers(name, rotated))).status_code == 200


async def test_tls_with_sni_routing_and_require_tls(env, pooled, tmp_path):
    from pgfleet.edge.server import EdgeServer
    from pgfleet.proxy.tls import ensure_local_ca, server_context

    files = ensure_local_ca(tmp_path / "tls", "db.localhost", [])
    secure = EdgeServer(env.fleet, env.proxy, pooled, "127.0.0.1", 0, tls=server_context(files))
    plain = EdgeServer(env.fleet, env.proxy, pooled, "127.0.0.1", 0)
    await secure.start()
    await plain.start()
    try:
        created = await env.fleet.create("vault", require_tls=True, cooldown_ms=600_000)
        # the connection string names another database: the TLS server name wins
        h = {"Neon-Connection-String": f"postgresql://vault:{created.password}@127.0.0.1/elsewhere"}
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(files.ca)), timeout=60) as client:
            r = await client.post(f"https://127.0.0.1:{secure.port}/sql", json={"query": "SELECT 1 AS one"},
                                  headers=h, extensions={"sni_hostname": "vault.db.localhost"})
            assert r.status_code == 200, r.text
            assert r.json()["rows"] == [{"one": 1}]
        # a WebSocket over TLS: the upgrade hands the TLS connection to aiohttp
        import aiohttp

        from pgfleet.pgwire import messages as m
        from pgfleet.pgwire.protocol import BackendMsg, FrontendMsg
        from pgfleet.pgwire.framing import Framer

        tls = ssl.create_default_context(cafile=str(files.ca))
        tls.check_hostname = False
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"https://127.0.0.1:{secure.port}/v2?address=vault.db.localhost:5432",
                                          ssl=tls, server_hostname="vault.db.localhost") as ws:
                await ws.send_bytes(m.startup_message({"user": "vault", "database": "vault"})
                                    + m.message(FrontendMsg.PASSWORD, created.password.encode() + b"\0")
                                    + m.message(FrontendMsg.QUERY, b"SELECT 40 + 2\0"))
                buf, kinds = Framer(), []
                while BackendMsg.DATA_ROW not in kinds:
                    msg = await ws.receive(timeout=60)
                    assert msg.type == aiohttp.WSMsgType.BINARY, msg
                    kinds += [kind for kind, _ in buf.messages(msg.data)]
                    assert BackendMsg.ERROR_RESPONSE not in kinds
        async with httpx.AsyncClient(timeout=60) as client:
            r = await client.post(f"http://127.0.0.1:{plain.port}/sql", json={"query": "SELECT 1"},
                                  headers={"Neon-Connection-String": f"postgresql://vault:{created.password}@x/vault"})
            assert r.status_code == 400 and r.json()["code"] == "28000"
    finally:
        await secure.close()
        await plain.close()


def prepared_names(edge, name: str) -> set[str]:
    """The statements the pooled server connections of a database have prepared."""
    pool = edge.pooled.pool_for(edge.fleet.find(name))
    return set().union(*(c.prepared for c in pool.conns))


async def test_recurring_queries_run_as_prepared_statements(edge, db):
    name, password = db
    h = neon_headers(name, password)
    query = {"query": "SELECT $1::int * 2 AS n", "params": [21]}
    assert (await post(edge, query, h)).json()["rows"] == [["42"]]
    assert not prepared_names(edge, name)  # a one-off text stays unnamed
    for value in (1, 2, 3):
        r = await post(edge, {**query, "params": [value]}, h)
        assert r.status_code == 200 and r.json()["rows"] == [[str(value * 2)]]
    assert len(prepared_names(edge, name)) == 1
    # the same text twice in a batch is prepared once; an error after the Parse keeps it prepared
    r = await post(edge, {"queries": [{"query": "SELECT 10 / $1::int AS q", "params": [5]},
                                      {"query": "SELECT 10 / $1::int AS q", "params": [2]}]}, h)
    assert r.status_code == 200 and [x["rows"] for x in r.json()["results"]] == [[["2"]], [["5"]]]
    r = await post(edge, {"query": "SELECT 10 / $1::int AS q", "params": [0]}, h)
    assert r.status_code == 400 and r.json()["code"] == "22012"
    r = await post(edge, {"query": "SELECT 10 / $1::int AS q", "params": [10]}, h)
    assert r.status_code == 200 and r.json()["rows"] == [["1"]]


async def test_prepared_statements_follow_schema_changes_and_deallocation(edge, db):
    name, password = db
    h = neon_headers(name, password)
    assert (await post(edge, {"query": "CREATE TABLE shape (a int)"}, h)).status_code == 200
    await post(edge, {"query": "INSERT INTO shape VALUES (1)"}, h)
    for _ in range(3):
        assert (await post(edge, {"query": "SELECT * FROM shape"}, h)).json()["rows"] == [["1"]]
    assert prepared_names(edge, name)
    # the prepared plan's result changes shape: the server refuses it, the request runs unnamed
    await post(edge, {"query": "ALTER TABLE shape ADD COLUMN b text DEFAULT 'x'"}, h)
    r = await post(edge, {"query": "SELECT * FROM shape"}, h)
    assert r.status_code == 200, r.text
    assert r.json()["rows"] == [["1", "x"]] and [f["name"] for f in r.json()["fields"]] == ["a", "b"]
    # statements dropped behind the proxy's back (DEALLOCATE inside a function): run again unnamed
    for _ in range(2):
        await post(edge, {"query": "SELECT * FROM shape"}, h)
    r = await post(edge, {"query": "DO $$BEGIN EXECUTE 'DEALLOCATE ALL'; END$$"}, h)
    assert r.status_code == 200, r.text
    r = await post(edge, {"query": "SELECT * FROM shape"}, h)
    assert r.status_code == 200 and r.json()["rows"] == [["1", "x"]], r.text
    r = await post(edge, {"query": "DEALLOCATE ALL"}, h)  # seen by the proxy: that connection is not reused
    assert r.status_code == 200, r.text
    r = await post(edge, {"query": "SELECT * FROM shape"}, h)
    assert r.status_code == 200 and r.json()["rows"] == [["1", "x"]], r.text


# --- the HTTP/1.1 connection itself (pgfleet.edge.http, and what it hands to aiohttp) ---------------
def raw_request(name: str, password: str, body: bytes, *extra: str) -> bytes:
    head = ["POST /sql HTTP/1.1", "Host: x", f"Neon-Connection-String: postgresql://{name}:{password}@x/{name}",
            "Neon-Array-Mode: true", "Neon-Raw-Text-Output: true", *extra]
    if not any(h.lower().startswith("transfer-encoding") for h in extra):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def read_answer(reader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    lines = head.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


async def test_keep_alive_pipelining_and_split_requests(edge, db):
    import asyncio

    name, password = db
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    try:
        # two requests in one write: two answers, in order
        writer.write(raw_request(name, password, b'{"query": "SELECT 1"}')
                     + raw_request(name, password, b'{"query": "SELECT 2"}'))
        assert (await read_answer(reader))[2] == b'{"command":"SELECT","rowCount":1,"rows":[["1"]],' \
            b'"fields":[{"name":"?column?","dataTypeID":23,"tableID":0,"columnID":0,"dataTypeSize":4,' \
            b'"dataTypeModifier":-1,"format":"text"}],"rowAsArray":true}'
        assert b'[["2"]]' in (await read_answer(reader))[2]
        # one request a few bytes at a time
        for i, piece in enumerate(raw_request(name, password, b'{"query": "SELECT 3"}')):
            writer.write(bytes([piece]))
            if i % 40 == 0:
                await writer.drain()
                await asyncio.sleep(0)
        status, headers, body = await read_answer(reader)
        assert status == 200 and b'[["3"]]' in body and headers["access-control-allow-origin"] == "*"
        # a wrong password is answered before the body, which is skipped: the connection goes on
        writer.write(raw_request(name, password + "x", b'{"query": "SELECT 4"}'))
        status, _, body = await read_answer(reader)
        assert status == 400 and b"28P01" in body
        writer.write(raw_request(name, password, b'{"query": "SELECT 5"}'))
        assert b'[["5"]]' in (await read_answer(reader))[2]
        # a chunked body, HTTP/1.0, GET: aiohttp takes the connection over, and answers alike
        writer.write(raw_request(name, password, b'15\r\n{"query": "SELECT 6"}\r\n0\r\n\r\n',
                                 "Transfer-Encoding: chunked"))
        status, _, body = await read_answer(reader)
        assert status == 200 and b'[["6"]]' in body
        writer.write(raw_request(name, password, b'{"query": "SELECT 7"}'))
        assert b'[["7"]]' in (await read_answer(reader))[2]
    finally:
        writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    try:
        writer.write(b"GET /sql HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_answer(reader))[0] == 405
        writer.write(raw_request(name, password, b'{"query": "SELECT 8"}').replace(b"HTTP/1.1", b"HTTP/1.0"))
        assert b'[["8"]]' in (await read_answer(reader))[2]
    finally:
        writer.close()


async def test_body_over_the_limit_ends_the_connection(edge, db):
    import asyncio

    name, password = db
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    try:
        body = b'{"query": "SELECT 1", "params": ["' + b"x" * (edge.settings.max_request_bytes) + b'"]}'
        writer.write(raw_request(name, password, body)[:2000])  # the head and a start: never all of it
        status, headers, answer = await read_answer(reader)
        assert status == 413 and headers["connection"] == "close" and b"limit" in answer
        assert await reader.read() == b""
    finally:
        writer.close()


async def test_a_client_that_does_not_read_its_answers_holds_them_back(edge, db):
    """Requests sent ahead while the answers pile up unread are answered one at a time, in
    order, as the client reads (the listener stops reading meanwhile)."""
    import asyncio

    name, password = db
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port, limit=1 << 20)
    try:
        count = 80
        for i in range(count):
            writer.write(raw_request(name, password, b'{"query": "SELECT %d, repeat(\'x\', 200000)"}' % i))
        await writer.drain()
        # the answers fill the socket and the transport's buffer: the listener waits for the client
        await until(lambda: any(c._drained is not None for c in edge._fast))
        for i in range(count):
            status, _, body = await read_answer(reader)
            assert status == 200 and body.startswith(b'{"command":"SELECT","rowCount":1,"rows":[["%d",' % i)
    finally:
        writer.close()


async def test_a_client_gone_mid_query_cancels_it(edge, db):
    """The client closes its connection while its query runs: the request is cancelled (its
    server connection, in an unknown state, is discarded) and nothing is left in flight."""
    import asyncio

    name, password = db
    h = neon_headers(name, password)
    assert (await post(edge, {"query": "SELECT 1"}, h)).status_code == 200
    pool = edge.pooled.pool_for(edge.fleet.find(name))
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    writer.write(raw_request(name, password, b'{"query": "SELECT pg_sleep(60)"}'))
    await writer.drain()
    await until(lambda: edge.in_flight)
    busy = set(pool.conns) - set(pool.idle)
    writer.close()
    await until(lambda: not edge.in_flight)
    assert not busy & set(pool.conns)  # discarded, not given back mid-query
    assert (await post(edge, {"query": "SELECT 2"}, h)).json()["rows"] == [["2"]]
