"""Session parameters of pooled clients: each client keeps its own, whichever server
connection it lands on (what PgBouncer does for its tracked parameters, for every one).

A client wants values: the server's defaults, overlaid with its startup packet's parameters
(validated and canonicalised by the server), then updated by what the server says while the
client holds a connection: ParameterStatus after the client's own SET, and, for parameters
Postgres does not report (search_path before 18, extra_float_digits, custom ones), the
answer to a question the proxy asks after a transaction that ran SET/RESET on them. Each
server connection knows its current values the same way.

Both are interned `ParamSet`s, so the per-transaction check is one identity comparison;
only when they differ does the proxy send one simple Query (RESET / set_config()) ahead of
the client's own messages.
"""

from __future__ import annotations

import re
import weakref

from pgfleet.pgwire import messages as m
from pgfleet.pgwire.protocol import FrontendMsg
from pgfleet.pgwire.client import quote_ident, quote_literal

#: reported parameters that are not session state a client sets
UNTRACKED = frozenset({
    "server_version", "server_encoding", "integer_datetimes", "in_hot_standby", "is_superuser",
    "session_authorization",
})
#: client encodings in which any UTF-8 SQL text reaches the server unchanged
_RAW_ENCODINGS = frozenset({"UTF8", "SQL_ASCII"})
#: a tracked value larger than this is not carried around: the connection is discarded instead
MAX_VALUE = 64 * 1024

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(?:\.[A-Za-z_][A-Za-z0-9_$]*)*\Z")


class ParamSet:
    """Values of tracked parameters (name -> value; absent: the server's default). Interned
    per pool: equal sets are the same object."""

    __slots__ = ("values", "_to", "__weakref__")

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self._to: dict[ParamSet, tuple[bytes, int]] = {}

    def sync_from(self, current: "ParamSet") -> tuple[bytes, int]:
        """Query messages that bring a connection at `current` to these values, and how
        many ReadyForQuery they are answered with."""
        cached = self._to.get(current)
        if cached is None:
            if len(self._to) >= 64:
                self._to.clear()
            cached = self._to[current] = sync_queries(current.values, self.values)
        return cached


class ParamRegistry:
    """A pool's parameter sets and what it knows of the server's parameters."""

    def __init__(self) -> None:
        self._interned: weakref.WeakValueDictionary[frozenset, ParamSet] = weakref.WeakValueDictionary()
        self.reported: dict[str, str] = {}  # lower-case name -> the name the server reports it as
        self.base = self.intern({})  # what a client without parameters wants: the defaults
        self._validated: dict[frozenset, ParamSet] = {}

    def intern(self, values: dict[str, str]) -> ParamSet:
        key = frozenset(values.items())
        pset = self._interned.get(key)
        if pset is None:
            pset = self._interned[key] = ParamSet(values)
        return pset

    def with_values(self, pset: ParamSet, changes: dict[str, str | None]) -> ParamSet:
        """`pset` with some values replaced (None: back to the default)."""
        values = pset.values
        if all(values.get(k) == v for k, v in changes.items()):
            return pset
        new = dict(values)
        for k, v in changes.items():
            if v is None:
                new.pop(k, None)
            else:
                new[k] = v
        return self.intern(new)

    def learn(self, status: dict[str, str]) -> ParamSet:
        """A new server connection's startup ParameterStatus: its ParamSet. The first one
        also gives the defaults every client starts from."""
        tracked = {}
        for name, value in status.items():
            canon = self.tracked_name(name)
            if canon is not None:
                tracked[canon] = value
        pset = self.intern(tracked)
        if not self.base.values:
            self.base = pset
        return pset

    def tracked_name(self, reported: str) -> str | None:
        """The name a reported parameter is tracked under, or None if it is not tracked."""
        if reported in UNTRACKED:
            return None
        return self.reported.setdefault(reported.lower(), reported)

    def name_of(self, name: str) -> str:
        """The canonical name of a parameter a client gave: as the server reports it, else
        lower case (parameter names are case-insensitive)."""
        lower = name.lower()
        return self.reported.get(lower, lower)

    def is_reported(self, name: str) -> bool:
        return name.lower() in self.reported

    def validated(self, key: frozenset) -> ParamSet | None:
        return self._validated.get(key)

    def remember(self, key: frozenset, pset: ParamSet) -> None:
        if len(self._validated) >= 1024:  # many distinct startup packets: start over
            self._validated.clear()
        self._validated[key] = pset


def check_name(name: str) -> bool:
    return len(name) <= 200 and _NAME.match(name) is not None


literal = quote_literal


def identifier(name: str) -> str:
    """A parameter name, custom ones (`ext.name`) quoted part by part."""
    return ".".join(quote_ident(part) for part in name.split("."))


def hex_text(expr: str) -> str:
    """`expr` (text) as hex of its UTF-8 bytes: readable whatever the client encoding."""
    return f"encode(convert_to({expr}, 'UTF8'), 'hex')"


def query(sql: str) -> bytes:
    return m.message(FrontendMsg.QUERY, sql.encode("utf-8", "surrogateescape") + b"\0")


def _switch_needed(sql: str, client_encoding: str | None) -> bool:
    """Non-ASCII SQL cannot be sent on a connection whose client_encoding is not UTF-8
    (the server would convert it from that encoding): switch to UTF-8 first."""
    return not sql.isascii() and client_encoding not in _RAW_ENCODINGS


_TO_UTF8 = query("SELECT set_config('client_encoding', 'UTF8', false)")


def sync_queries(have: dict[str, str], want: dict[str, str]) -> tuple[bytes, int]:
    resets = sorted(n for n in have if n not in want)
    sets = {n: v for n, v in want.items() if have.get(n) != v}
    parts = [f"RESET {identifier(n)}" for n in resets]
    sql = _set_sql(parts, sets)
    if _switch_needed(sql, have.get("client_encoding")):
        if "client_encoding" in want:  # the switch changes it: set it back last
            sets["client_encoding"] = want["client_encoding"]
        return _TO_UTF8 + query(_set_sql(parts, sets)), 2
    return query(sql), 1


def _set_sql(parts: list[str], sets: dict[str, str]) -> str:
    if sets:
        parts = parts + ["SELECT " + ", ".join(f"set_config({literal(n)}, {literal(v)}, false)"
                                                for n, v in sets.items())]
    return "; ".join(parts)


def validation_queries(requested: dict[str, str], client_encoding: str | None) -> tuple[bytes, int]:
    """Set a new client's startup parameters from the defaults (RESET first: DateStyle and
    the like merge with the current value) and return their canonical values, hex-encoded."""
    parts = [f"RESET {identifier(n)}" for n in requested]
    parts.append("SELECT " + ", ".join(hex_text(f"set_config({literal(n)}, {literal(v)}, false)")
                                       for n, v in requested.items()))
    sql = "; ".join(parts)
    if _switch_needed(sql, client_encoding):
        return _TO_UTF8 + query(sql), 2
    return query(sql), 1


def probe_query(names: list[str]) -> bytes:
    """Asks the current values of parameters the server does not report (NULL: unknown)."""
    return query("SELECT " + ", ".join(hex_text(f"current_setting({literal(n)}, true)") for n in names))


def decode_hex_row(body: bytes) -> list[str | None]:
    """A DataRow of hex_text() columns."""
    return [None if v is None else bytes.fromhex(v.decode("ascii")).decode("utf-8", "surrogateescape")
            for v in m.parse_data_row(body)]


def parse_options(options: str) -> dict[str, str]:
    """The `options` startup parameter (`-c name=value`, `--name=value`, as libpq passes
    them; backslash escapes a space) as parameters. Anything else raises ValueError."""
    args: list[str] = []
    cur: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if cur:
                args.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        args.append("".join(cur))
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-c" and i + 1 < len(args):
            setting = args[i + 1]
            i += 2
        elif arg.startswith("-c") and len(arg) > 2:
            setting, i = arg[2:], i + 1
        elif arg.startswith("--") and len(arg) > 2:
            setting, i = arg[2:], i + 1
        else:
            raise ValueError(f"unsupported option {arg!r}: only -c name=value is supported here")
        name, eq, value = setting.partition("=")
        if not eq:
            raise ValueError(f"option {setting!r} has no value")
        out[name.replace("-", "_")] = value
    return out


# --- SQL that changes session parameters -------------------------------------------------

ALL = "*"  # every parameter (RESET ALL, DISCARD ALL)

_IDENT = rb'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
SESSION_SQL = re.compile(
    rb"\s*(?:(?P<discard>discard\s+all\b)|(?P<verb>set|reset)\s+"
    rb"(?:session\s+(?!authorization\b|characteristics\b))?(?P<name>" + _IDENT + rb"(?:\s*\.\s*" + _IDENT + rb")*))",
    re.IGNORECASE,
)
_PART = re.compile(_IDENT)
#: SET/RESET targets that are not session parameters, or not for the session
_NOT_SESSION = frozenset({"local", "transaction", "constraints", "role", "session"})
#: SET's own spellings of some parameters
_ALIASES = {"time": "timezone", "schema": "search_path", "names": "client_encoding", "xml": "xmloption"}


def session_sql_names(match: re.Match) -> tuple[str, ...] | str | None:
    """The parameters a statement matched by SESSION_SQL may change: names, ALL, or None."""
    if match.group("discard"):
        return ALL
    parts = []
    for p in _PART.findall(match.group("name")):
        text = p.decode("utf-8", "replace")
        parts.append(text[1:-1].replace('""', '"') if text.startswith('"') else text.lower())
    name = ".".join(parts)
    if len(parts) == 1 and not match.group("name").startswith(b'"'):
        if name in _NOT_SESSION:
            return None
        if name == "all":
            return ALL if match.group("verb").lower() == b"reset" else None
        name = _ALIASES.get(name, name)
    return (name.lower(),)

