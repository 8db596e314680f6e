"""The pooled client's messages on their way to the server: walked in place, forwarded as
slices of what arrived, the few the proxy must understand read (whole or by their start).
"""

from __future__ import annotations

import re
import time

from pgfleet.pgwire import messages as m
from pgfleet.pgwire.framing import MAX_MESSAGE_LENGTH
from pgfleet.pgwire.protocol import FrontendMsg, kinds

from .client_state import ClientPhase, ClientState
from .expect import EXP_BIND, EXP_PARSE, EXP_QUERY, NOT_FAST, PASS_THROUGH, PEEK
from .statement_mapping import OverBudget

#: the types the hot loops test, bound as plain ints (an enum attribute lookup costs ~6x a global's)
_QUERY = int(FrontendMsg.QUERY)
_PARSE = int(FrontendMsg.PARSE)
_SYNC = int(FrontendMsg.SYNC)
_from_bytes = int.from_bytes
_IDLE = ClientPhase.IDLE
#: the third byte of the SQL "SELECT" (upper or lower case): a Query starting "s?l" is not SET
_SELECT_THIRD = b"lL"
#: first bytes of a Query that may need a look (SET, RESET, DEALLOCATE, DISCARD, whitespace)
_SQL_FIRST = frozenset(b"sSrRdD \t\r\n")
_DEALLOCATE_START = re.compile(rb"\s*(?:deallocate|discard)\b", re.IGNORECASE)
#: DEALLOCATE / DISCARD statements longer than this are not looked at
SMALL_SQL = 4096
#: messages that leave the server's extended-protocol state as it was: Query, FunctionCall
#: (which answer with ReadyForQuery) and COPY data (which a COPY consumes, or the server ignores)
_CLEAN = kinds(FrontendMsg.QUERY, FrontendMsg.FUNCTION_CALL, FrontendMsg.COPY_DATA, FrontendMsg.COPY_DONE,
               FrontendMsg.COPY_FAIL)
#: messages decided by the start of their body
_LOOK = kinds(FrontendMsg.QUERY, FrontendMsg.PARSE, FrontendMsg.BIND)
_NAMES = {FrontendMsg.PARSE: "a named Parse message", FrontendMsg.BIND: "a Bind message",
          FrontendMsg.DESCRIBE: "a Describe message", FrontendMsg.CLOSE: "a Close message",
          FrontendMsg.QUERY: "a Query message"}


class ClientWalk(ClientState):
    """Client -> server (a part of PooledClient)."""

    def data_received(self, data: bytes) -> None:
        if self._discard is not None:
            self._discard.data_received(data)
            return
        self.pool.bytes_received += len(data)
        if (data[0] == _QUERY and len(data) == 1 + _from_bytes(data[1:5], "big") and len(data) > 8
                and (data[5] not in _SQL_FIRST or data[7] in _SELECT_THIRD)
                and not (cf := self._cframe).skip and not cf.head and cf.whole is None):
            # the fast path: one whole simple Query with nothing to look at (a SELECT, an
            # UPDATE...), on the bound server connection or on an idle one at hand
            conn = self.server
            if conn is None and self.phase is _IDLE and not self._backlog:
                conn = self.pool.try_acquire()
                if conn is not None:
                    self._attach(conn)
            if conn is not None:
                self.queue.append(EXP_QUERY)
                conn.transport.write(data)  # type: ignore[union-attr]
                return
        if self.server is not None:
            self._from_client(data)
            return
        if self.phase is not _IDLE or self._backlog:  # a connection is on its way
            self._backlog += data
            return
        if data[0] == FrontendMsg.TERMINATE and self._cframe.between:  # Terminate while idle
            self.close()
            return
        conn = self.pool.try_acquire()
        if conn is not None:  # the per-transaction fast path: an idle connection, no task
            self._attach(conn)
            if not self._cframe.between:
                self._from_client(data)
            else:
                self._walk_client(data)
                self._flush()
            return
        self._busy(True)
        self._backlog += data
        self.transport.pause_reading()  # type: ignore[union-attr]
        self.wait_since = time.monotonic()
        if self.pool.can_open():
            self.acquire_async()
        else:  # every connection is in use: the next one released comes here
            self.phase = ClientPhase.WAITING
            self.pool.wait(self)

    def _from_client(self, data: bytes) -> None:
        cf = self._cframe
        if cf.whole is not None:  # a message the proxy reads whole
            size = cf.whole_len
            buf, data = cf.gather(data)
            if buf is None:
                return
            self.pool.guards.memory.give(size)
            if not self._client_message(buf[0], bytes(memoryview(buf)[5:])):
                return
        elif cf.skip or cf.head:  # carried from the last read (the common case has nothing: no call)
            passing, data = cf.resume(data)
            if passing:  # the rest of a message streaming through
                if not data:
                    self.server.transport.write(passing)  # type: ignore[union-attr]
                    return
                self._out.append(passing)
        self._walk_client(data)
        self._flush()

    def _walk_client(self, data: bytes) -> None:
        """Walk the client's messages in place: runs of messages that go out as they came
        are written as slices of what arrived (usually the whole read, uncopied); a message
        that does not end in this read streams on in the next."""
        out = self._out
        queue = self.queue
        pos, run, end = 0, 0, len(data)
        while end - pos >= 5:
            kind = data[pos]
            length = int.from_bytes(data[pos + 1 : pos + 5], "big")
            if length < 4 or length > MAX_MESSAGE_LENGTH:
                out.append(data[run:pos])
                self._flush()
                self._fatal("08P01", f"protocol violation: invalid message length {length}")
                return
            mend = pos + 1 + length
            whole = False
            exp = PASS_THROUGH.get(kind)
            if kind in _LOOK:  # decided by the start of the body
                if kind == _QUERY:
                    if length == 4 or (end > pos + 7 and (data[pos + 5] not in _SQL_FIRST
                                                          or data[pos + 7] in _SELECT_THIRD)):
                        pass  # the common case (not SET/RESET/DEALLOCATE/DISCARD; SELECT): nothing to look at
                    elif (look := pos + 5 + min(length - 4, PEEK)) > end:
                        break
                    elif _DEALLOCATE_START.match(data, pos + 5, look) and length <= SMALL_SQL:
                        whole = True
                    else:
                        self._note_sql(data, pos + 5, look)
                elif (look := pos + 5 + min(length - 4, PEEK)) > end:
                    break
                elif kind == _PARSE:  # an unnamed statement passes as it is
                    if length > 4 and data[pos + 5] == 0:
                        self._note_sql(data, pos + 6, look)
                        exp = EXP_PARSE
                    else:
                        whole = True
                else:  # Bind: the statement name may be rewritten, the rest streams
                    p_end = data.find(b"\0", pos + 5, look)
                    s_end = data.find(b"\0", p_end + 1, look) if p_end >= 0 else -1
                    if s_end < 0:
                        whole = True
                    else:
                        exp = EXP_BIND
                        if s_end > p_end + 1:  # a named statement
                            out.append(data[run:pos])
                            run = pos
                            cname = data[p_end + 1 : s_end]
                            sname = self._server_name(self.server, cname)  # type: ignore[arg-type]
                            if sname != cname:
                                out.append(bytes((kind,)) + (length + len(sname) - len(cname)).to_bytes(4, "big")
                                           + data[pos + 5 : p_end + 1] + sname)
                                run = s_end
            elif exp is NOT_FAST:  # Describe, Close, Terminate: read whole
                whole = True
            if whole:
                out.append(data[run:pos])
                if length > self.pool.max_read_whole:
                    self._flush()
                    self._fatal("54000", f"{_NAMES.get(kind, 'message')} of {length} bytes is longer than the pooled "
                                f"listener reads ({self.pool.max_read_whole} bytes); use an unnamed statement or "
                                "the direct listener")
                    return
                if mend > end:
                    if not self.pool.guards.memory.take(1 + length):
                        self._flush()
                        self._fatal("54000", "the pooled listener's memory for messages it must read is exhausted; "
                                    "retry shortly")
                        return
                    self._cframe.start_whole(data, pos, mend)
                    return
                if not self._client_message(kind, data[pos + 5 : mend]):
                    return
                pos = run = mend
                continue
            if exp is not None:
                queue.append(exp)
            if kind not in _CLEAN:
                self._unsynced = kind != _SYNC
            if mend > end:
                self._cframe.skip = mend - end
                pos = end
                break
            pos = mend
        self._cframe.finish(data, run, pos, out)

    def _client_message(self, kind: int, body: bytes) -> bool:
        """One whole message the proxy reads; False when the session ended."""
        server = self.server
        assert server is not None
        if kind == FrontendMsg.TERMINATE:
            self._flush()
            self.close()
            return False
        if kind != FrontendMsg.QUERY:
            self._unsynced = True
        handler = self.HANDLERS.get(kind)
        if handler is not None:
            try:
                handler(self, server, body)
            except OverBudget as exc:
                self._flush()
                self._fatal("54000", str(exc))
                return False
            except ValueError:
                self._flush()
                self._fatal("08P01", f"protocol violation: malformed {chr(kind)!r} message")
                return False
            return True
        if kind == FrontendMsg.QUERY:  # DEALLOCATE / DISCARD need bookkeeping
            body = self._sql_deallocate(server, body)
        self._out.append(m.message(kind, body))
        exp = PASS_THROUGH.get(kind)
        if exp is not None and exp is not NOT_FAST:
            self.queue.append(exp)
        return True

    def _flush(self) -> None:
        out = self._out
        if out:
            if self.server is not None and self.server.transport is not None:
                self.server.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
