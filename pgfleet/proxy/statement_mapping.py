"""A pooled client's named prepared statements on whichever server connection it holds
(statements.py keeps their texts): as PgBouncer 1.21+ does, each server connection
remembers which statements it has prepared, under names derived from their text, and a
statement is (re)prepared on whichever server connection a client lands on.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable

from pgfleet.pgwire import messages as m
from pgfleet.pgwire.protocol import FrontendMsg, Target, byte

from . import params as pm
from .client_state import ClientState
from .expect import (CLOSE_COMPLETE, DROP, EXP_BIND, EXP_CLOSE, EXP_PARAMS, EXP_PARSE, EXP_ROWS, FWD, PARSE_COMPLETE,
                     PARSED, PEEK, SYNTH, Answer, Expect)
from .statements import server_statement_name

if TYPE_CHECKING:
    from .pool import ServerConn


class OverBudget(Exception):
    """Holding what the client asks for would exceed the daemon's memory budget."""


_STATEMENT = byte(Target.STATEMENT)
_DEALLOCATE = re.compile(
    rb"^\s*(?:DISCARD\s+ALL|DEALLOCATE\s+(?:PREPARE\s+)?(?P<name>ALL|\"[^\"]+\"|[A-Za-z_][A-Za-z0-9_$]*))\s*;?\s*\x00$",
    re.IGNORECASE,
)


class StatementMapping(ClientState):
    """A pooled client's named statements on whichever server connection it holds (a part
    of PooledClient): Parse/Bind/Describe/Close take the server's name, a statement the
    connection lacks is prepared first (its answer dropped), and a Parse the server already
    has or a Close it keeps is answered by the proxy, in order."""

    def _parse(self, server: ServerConn, body: bytes) -> None:
        end = body.index(b"\0")
        name, rest = body[:end], body[end + 1 :]
        sets = self._note_sql(rest, 0, min(len(rest), PEEK))
        if not name:
            self._out.append(m.message(FrontendMsg.PARSE, body))
            self.queue.append(EXP_PARSE)
            return
        sname = server_statement_name(rest)
        if not self.statements.add(name.decode(errors="replace"), sname, rest, sets):
            raise OverBudget("the pooled listener's memory for prepared statements is exhausted; "
                              "deallocate statements or use unnamed ones")
        if sname in server.prepared:
            self._synth(PARSE_COMPLETE)
        else:
            self._prepare_on(server, sname, rest, FWD)

    def _prepare_on(self, server: ServerConn, sname: str, rest: bytes, kind: Answer) -> None:
        server.prepared.add(sname)
        self._out.append(m.message(FrontendMsg.PARSE, sname.encode() + b"\0" + rest))
        self.queue.append(Expect(kind, PARSED, on_error=lambda: server.prepared.discard(sname)))

    def _server_name(self, server: ServerConn, client_name: bytes) -> bytes:
        """Map a client statement name to the server's, preparing it there if needed."""
        if not client_name:
            return client_name
        known = self.statements.get(client_name.decode(errors="replace"))
        if known is None:
            return client_name  # unknown: the server reports 26000 itself
        sname, rest, sets = known
        if sets is not None:
            self._mark(sets)
        if sname not in server.prepared:
            self._prepare_on(server, sname, rest, DROP)
        return sname.encode()

    def _bind(self, server: ServerConn, body: bytes) -> None:
        p_end = body.index(b"\0")
        s_end = body.index(b"\0", p_end + 1)
        sname = self._server_name(server, body[p_end + 1 : s_end])
        self._out.append(m.message(FrontendMsg.BIND, body[: p_end + 1] + sname + body[s_end:]))
        self.queue.append(EXP_BIND)

    def _describe(self, server: ServerConn, body: bytes) -> None:
        if body[:1] == _STATEMENT:
            sname = self._server_name(server, body[1:-1])
            self._out.append(m.message(FrontendMsg.DESCRIBE, _STATEMENT + sname + b"\0"))
            self.queue.append(EXP_PARAMS)  # ParameterDescription, then
        else:
            self._out.append(m.message(FrontendMsg.DESCRIBE, body))
        self.queue.append(EXP_ROWS)  # RowDescription or NoData

    def _close(self, server: ServerConn, body: bytes) -> None:
        if body[:1] == _STATEMENT and body[1:-1]:
            # the server keeps it for the next client that prepares the same statement
            self.statements.pop(body[1:-1].decode(errors="replace"))
            self._synth(CLOSE_COMPLETE)
            return
        self._out.append(m.message(FrontendMsg.CLOSE, body))
        self.queue.append(EXP_CLOSE)

    def _sql_deallocate(self, server: ServerConn, body: bytes) -> bytes:
        """SQL that drops prepared statements (psycopg sends DEALLOCATE ALL after a DROP or
        ROLLBACK): keep the statement maps true, and translate a client's name to the
        server's."""
        m_ = _DEALLOCATE.match(body)
        if m_ is None:
            return body
        target = m_.group("name")
        if target is None or target.upper() == b"ALL":  # DISCARD ALL or DEALLOCATE ALL
            if target is None:  # DISCARD ALL also resets every session parameter
                self._mark(pm.ALL)
            server.prepared.clear()
            self.statements.clear()
            return body
        known = self.statements.pop(target.strip(b'"').decode(errors="replace"))
        if known is None:
            return body  # not one of ours: the server answers for itself
        server.prepared.discard(known[0])
        return b"DEALLOCATE " + known[0].encode() + b"\0"

    def _synth(self, message: bytes) -> None:
        if not self.queue:
            self.transport.write(message)  # type: ignore[union-attr]
        else:
            self.queue.append(Expect(SYNTH, payload=message))

    #: the client messages the mapping reads whole
    HANDLERS: dict[int, Callable[[Any, ServerConn, bytes], None]] = {
        FrontendMsg.PARSE: _parse,
        FrontendMsg.BIND: _bind,
        FrontendMsg.DESCRIBE: _describe,
        FrontendMsg.CLOSE: _close,
    }
