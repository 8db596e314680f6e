"""SQL over HTTP: a request's queries as Postgres extended-protocol messages, and the
server's answers as the JSON the Neon driver reads.

Every request is one pipelined round trip on a pooled server connection: a single query is
Parse/Bind/Describe/Execute/Sync; a batch is `BEGIN ...`, each query, `COMMIT`, Sync, then a
`ROLLBACK` that ends the transaction if a query failed (and is a harmless notice otherwise).
Values travel as text both ways (parameter types are inferred by the server).

A query text that recurs is prepared on the server connection under the pooled listener's
name for it (shared with pooled clients), and later runs there as Bind/Describe/Execute: the
server's parse and plan of a small query cost about as much as the proxy's whole HTTP path.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import OrderedDict
from collections.abc import Container
from dataclasses import dataclass
from typing import Any, NamedTuple

from pgfleet.pgwire import messages as m
from pgfleet.pgwire.protocol import BackendMsg, FrontendMsg, Target, TransactionStatus, byte
from pgfleet.proxy import params as pm
from pgfleet.proxy.statements import server_statement_name

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_FIELD = struct.Struct("!ihihih")
MAX_PARAMS = 65535
_IDLE_STATUS = byte(TransactionStatus.IDLE)

#: a query text is prepared on the server connections when seen again among the last this many
#: distinct texts (a one-off query is not: it would only hold server memory)
RECENT_TEXTS = 1024
#: longer query texts always run unnamed (bounds what prepared statements hold in the server)
MAX_PREPARED_TEXT = 4096
#: statements prepared on one server connection past which new ones run unnamed instead
MAX_PREPARED_PER_CONNECTION = 256
_CACHED_PLAN = "cached plan must not change result type"
_DEALLOCATE = re.compile(rb"\s*deallocate\b", re.IGNORECASE)
_NO_PARAM_TYPES = b"\0\0"

ISOLATION = {
    "serializable": "SERIALIZABLE", "readuncommitted": "READ UNCOMMITTED",
    "readcommitted": "READ COMMITTED", "repeatableread": "REPEATABLE READ",
}

# Postgres ErrorResponse field codes -> the JSON names node-postgres (and Neon) use
ERROR_FIELDS = {
    "C": "code", "D": "detail", "H": "hint", "P": "position", "p": "internalPosition", "q": "internalQuery",
    "S": "severity", "W": "where", "s": "schema", "t": "table", "c": "column", "d": "dataType",
    "n": "constraint", "F": "file", "L": "line", "R": "routine",
}


class BadRequest(ValueError):
    """The request cannot be run as given (HTTP 400, with no SQLSTATE)."""


class QueryFailed(Exception):
    """The server's ErrorResponse for one of the request's queries."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(fields.get("M", "error"))
        self.fields = fields

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.fields.get("M", "error")}
        for code, name in ERROR_FIELDS.items():
            out[name] = self.fields.get(code)
        return out


class Query(NamedTuple):  # a tuple: made per query, where a frozen dataclass's __init__ costs 5x
    sql: str
    params: tuple[str | None, ...]
    array_mode: bool | None  # None: the request's Neon-Array-Mode
    text: bytes = b""  # sql, encoded
    bind: bytes = b""  # the Bind message after its portal and statement names

    @staticmethod
    def make(sql: str, params: tuple[str | None, ...], array_mode: bool | None) -> "Query":
        try:
            text = sql.encode("utf-8")
            values = [None if p is None else p.encode("utf-8") for p in params]
        except UnicodeEncodeError:
            raise BadRequest("the query or a parameter is not valid Unicode") from None
        bind = [_I16.pack(0), _I16.pack(len(values))]
        for v in values:
            bind.append(_I32.pack(-1) if v is None else _I32.pack(len(v)) + v)
        bind.append(_I16.pack(0))
        return Query(sql, params, array_mode, text, b"".join(bind))


@dataclass(frozen=True)
class Batch:
    isolation: str | None = None
    read_only: bool = False
    deferrable: bool = False

    def begin(self) -> str:
        sql = "BEGIN"
        if self.isolation:
            sql += f" ISOLATION LEVEL {self.isolation}"
        if self.read_only:
            sql += " READ ONLY"
        if self.deferrable:
            sql += " DEFERRABLE"
        return sql


# --- the request ---------------------------------------------------------------------------
def parse_body(body: bytes, max_batch: int) -> tuple[list[Query], bool]:
    """JSON body -> (queries, is_batch)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("the request body must be a JSON object")
    if "queries" in doc:
        items = doc["queries"]
        if not isinstance(items, list):
            raise BadRequest('"queries" must be an array')
        if len(items) > max_batch:
            raise BadRequest(f"a batch holds at most {max_batch} queries")
        return [_query(item, f"queries[{i}]") for i, item in enumerate(items)], True
    return [_query(doc, "the request")], False


def _query(item: Any, where: str) -> Query:
    if not isinstance(item, dict):
        raise BadRequest(f"{where} must be a JSON object")
    sql = item.get("query")
    if not isinstance(sql, str):
        raise BadRequest(f'{where} needs "query", a string')
    if "\0" in sql:
        raise BadRequest(f"{where}: the query holds a NUL character")
    params = item.get("params", [])
    if params is None:
        params = []
    if not isinstance(params, list):
        raise BadRequest(f'{where}: "params" must be an array')
    if len(params) > MAX_PARAMS:
        raise BadRequest(f"{where}: at most {MAX_PARAMS} parameters")
    array_mode = item.get("arrayMode")
    if array_mode is not None and not isinstance(array_mode, bool):
        raise BadRequest(f'{where}: "arrayMode" must be true or false')
    return Query.make(sql, tuple(param_text(p) for p in params), array_mode)


def param_text(value: Any) -> str | None:
    """A JSON parameter as Postgres text: null is NULL, arrays are array literals, objects
    JSON text (what the driver's own encoding of JavaScript values gives)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if "\0" in value:
            raise BadRequest("a parameter holds a NUL character")
        return value
    if isinstance(value, int):
        return str(value)  # what json.dumps gives, without making an encoder
    if isinstance(value, float):
        return json.dumps(value)
    if isinstance(value, list):
        return _array_literal(value)
    return json.dumps(value, ensure_ascii=False)


def _array_literal(items: list) -> str:
    out = []
    for item in items:
        if item is None:
            out.append("NULL")
        elif isinstance(item, list):
            out.append(_array_literal(item))
        else:
            text = param_text(item) or ""
            out.append('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "{" + ",".join(out) + "}"


_COMMIT = Query.make("COMMIT", (), None)
_SYNC = m.message(FrontendMsg.SYNC)
_EXECUTE = m.message(FrontendMsg.EXECUTE, b"\0" + _I32.pack(0))
_DESCRIBE = m.message(FrontendMsg.DESCRIBE, byte(Target.PORTAL) + b"\0")


class Statements:
    """Which query texts run as named statements: those seen again among the recent ones.
    Remembers their server names only (a hash of the text, as the pool names statements)."""

    def __init__(self, recent: int = RECENT_TEXTS) -> None:
        self.recent = recent
        self._seen: OrderedDict[str, None] = OrderedDict()

    def name(self, query: Query) -> str | None:
        if len(query.text) > MAX_PREPARED_TEXT:
            return None
        sname = server_statement_name(query.text + b"\0" + _NO_PARAM_TYPES)
        seen = self._seen
        if sname in seen:
            seen.move_to_end(sname)
            return sname
        seen[sname] = None
        if len(seen) > self.recent:
            seen.popitem(last=False)
        return None


@dataclass
class Payload:
    data: bytes
    readies: int  # ReadyForQuery messages that answer it
    parsed: list[str | None]  # per Parse sent, in order: the statement name it prepares, if any


def messages(queries: list[Query], batch: Batch | None, names: list[str | None] | None = None,
             prepared: Container[str] = (), room: int = 0) -> Payload:
    """The pipelined messages of a request. `names`: each query's server statement name (None:
    unnamed); one in `prepared` is bound without a Parse, and at most `room` new ones are
    prepared (the others run unnamed)."""
    out: list[bytes] = []
    parsed: list[str | None] = []
    new: set[str] = set()
    if batch is not None:
        out.append(pm.query(batch.begin()))
    for i, q in enumerate(queries):
        name = names[i] if names is not None else None
        if name is None or (name not in prepared and name not in new and room <= 0):
            out.append(m.message(FrontendMsg.PARSE, b"\0" + q.text + b"\0" + _NO_PARAM_TYPES))
            parsed.append(None)
            sname = b""
        else:
            if name not in prepared and name not in new:  # prepared here, from now on
                out.append(m.message(FrontendMsg.PARSE, name.encode() + b"\0" + q.text + b"\0" + _NO_PARAM_TYPES))
                parsed.append(name)
                new.add(name)
                room -= 1
            sname = name.encode()
        out.append(m.message(FrontendMsg.BIND, b"\0" + sname + b"\0" + q.bind))
        out.append(_DESCRIBE)
        out.append(_EXECUTE)
    if batch is not None:
        out.append(m.message(FrontendMsg.PARSE, b"\0" + _COMMIT.text + b"\0" + _NO_PARAM_TYPES))
        parsed.append(None)
        out.append(m.message(FrontendMsg.BIND, b"\0\0" + _COMMIT.bind))
        out.append(_EXECUTE)
    out.append(_SYNC)
    if batch is not None:
        out.append(pm.query("ROLLBACK"))  # only if a query failed: a notice otherwise
        return Payload(b"".join(out), 3, parsed)
    return Payload(b"".join(out), 1, parsed)


def stale_statement(error: dict[str, str]) -> bool:
    """The server could not run a named statement as prepared (a table it reads changed shape,
    or a DEALLOCATE the proxy did not see): nothing ran, and the request can run again unnamed."""
    code = error.get("C")
    return code == "26000" or (code == "0A000" and error.get("M", "").startswith(_CACHED_PLAN))


def changes_session(sql: str) -> bool:
    """SET/RESET/DISCARD of a session parameter: the connection is not given back to the pool
    (the pooled listener follows such changes; one HTTP request has no session to keep)."""
    text = sql.encode("utf-8", "surrogateescape")
    if _DEALLOCATE.match(text):  # the connection's prepared statements are no longer what it recorded
        return True
    match = pm.SESSION_SQL.match(text)
    return match is not None and pm.session_sql_names(match) is not None


# --- the answers -------------------------------------------------------------------------
class Result:
    __slots__ = ("fields", "rows", "tag")

    def __init__(self, fields: list[tuple[str, int, int, int, int, int]] | None = None) -> None:
        self.fields = fields if fields is not None else []
        self.rows: list[list[bytes | None]] = []
        self.tag = ""


@dataclass
class Answers:
    results: list[Result]
    error: dict[str, str] | None
    clean: bool  # the connection ended idle, with its session parameters as before
    parse_completes: int = 0  # the Parse messages that succeeded (the first this many sent)


# the answers' message types as plain ints: read_answers compares each message against them, and
# an IntEnum attribute lookup costs 3x the comparison
_DATA_ROW, _ROW_DESCRIPTION, _NO_DATA, _COMMAND_COMPLETE, _EMPTY_QUERY, _ERROR, _READY, _PARAMETER_STATUS, \
    _PARSE_COMPLETE = map(int, (BackendMsg.DATA_ROW, BackendMsg.ROW_DESCRIPTION, BackendMsg.NO_DATA,
                                BackendMsg.COMMAND_COMPLETE, BackendMsg.EMPTY_QUERY_RESPONSE, BackendMsg.ERROR_RESPONSE,
                                BackendMsg.READY_FOR_QUERY, BackendMsg.PARAMETER_STATUS, BackendMsg.PARSE_COMPLETE))


def read_answers(msgs: list[tuple[int, bytes]]) -> Answers:
    results: list[Result] = []
    current: Result | None = None
    error: dict[str, str] | None = None
    status = _IDLE_STATUS
    parse_completes = 0
    reported = False
    for kind, body in msgs:
        if kind == _DATA_ROW:
            if current is not None:
                current.rows.append(m.parse_data_row(body))
        elif kind == _ROW_DESCRIPTION:
            current = Result(_row_description(body))
            results.append(current)
        elif kind == _NO_DATA:
            current = Result()
            results.append(current)
        elif kind == _COMMAND_COMPLETE or kind == _EMPTY_QUERY:
            if current is not None:
                current.tag = body[:-1].decode("utf-8", "replace") if kind == _COMMAND_COMPLETE else ""
                current = None
        elif kind == _ERROR:
            if error is None:
                error = m.parse_error_fields(body)
            current = None
        elif kind == _READY:
            status = body[:1]
        elif kind == _PARAMETER_STATUS:  # a reported parameter changed
            reported = True
        elif kind == _PARSE_COMPLETE:
            parse_completes += 1
    return Answers(results, error, clean=status == _IDLE_STATUS and not reported, parse_completes=parse_completes)


def _row_description(body: bytes) -> list[tuple[str, int, int, int, int, int]]:
    (count,) = _I16.unpack_from(body, 0)
    pos, out = 2, []
    for _ in range(count):
        end = body.index(b"\0", pos)
        name = body[pos:end].decode("utf-8", "replace")
        table, column, type_oid, size, modifier, _fmt = _FIELD.unpack_from(body, end + 1)
        out.append((name, table, column, type_oid, size, modifier))
        pos = end + 1 + _FIELD.size
    return out


def result_json(result: Result, array_mode: bool, raw_text: bool) -> dict[str, Any]:
    names = [f[0] for f in result.fields]
    converters = [None if raw_text else _CONVERT.get(f[3]) for f in result.fields]
    rows: list[Any] = []
    for values in result.rows:
        row = [_value(v, c) for v, c in zip(values, converters)]
        rows.append(row if array_mode else dict(zip(names, row)))
    return {
        "command": result.tag.split(" ", 1)[0],
        "rowCount": _row_count(result.tag),
        "rows": rows,
        "fields": [{"name": n, "dataTypeID": t, "tableID": tab, "columnID": col, "dataTypeSize": size,
                    "dataTypeModifier": mod, "format": "text"} for n, tab, col, t, size, mod in result.fields],
        "rowAsArray": array_mode,
    }


def _row_count(tag: str) -> int | None:
    last = tag.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() and " " in tag else None


def _value(raw: bytes | None, convert) -> Any:
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace")
    return convert(text) if convert is not None else text


# --- typed JSON values (without Neon-Raw-Text-Output), as Neon's proxy gives them ---------------
def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return text
    return value if math.isfinite(value) else text


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _array(element):
    def convert(text: str) -> Any:
        try:
            return _parse_array(text, element)
        except (ValueError, IndexError):
            return text
    return convert


def _parse_array(text: str, element) -> Any:
    """A Postgres array literal ('{1,2,NULL}', nested, quoted) -> a JSON array."""
    if text.startswith("["):  # explicit bounds: '[0:1]={...}'
        text = text[text.index("=") + 1:]
    pos = 0

    def parse() -> list:
        nonlocal pos
        if text[pos] != "{":
            raise ValueError("not an array")
        pos += 1
        out: list = []
        while text[pos] != "}":
            if text[pos] == "{":
                out.append(parse())
            elif text[pos] == '"':
                pos += 1
                chars = []
                while text[pos] != '"':
                    if text[pos] == "\\":
                        pos += 1
                    chars.append(text[pos])
                    pos += 1
                pos += 1
                value = "".join(chars)
                out.append(element(value) if element else value)
            else:
                end = pos
                while text[end] not in ",}":
                    end += 1
                word = text[pos:end].strip()
                out.append(None if word.upper() == "NULL" else (element(word) if element else word))
                pos = end
            if text[pos] == ",":
                pos += 1
        pos += 1
        return out

    return parse()


def _bool(text: str) -> Any:
    return text == "t"


_CONVERT: dict[int, Any] = {16: _bool, 20: _number, 21: _number, 23: _number, 26: _number, 700: _number,
                            701: _number, 114: _json, 3802: _json}
_CONVERT.update({1000: _array(_bool), 1016: _array(_number), 1005: _array(_number), 1007: _array(_number),
                 1021: _array(_number), 1022: _array(_number), 199: _array(_json), 3807: _array(_json),
                 1009: _array(None), 1015: _array(None)})
