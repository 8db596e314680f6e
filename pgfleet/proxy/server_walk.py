"""The server's answers on their way to the pooled client: walked in place against the
queue of expected answers, forwarded as slices of what arrived; answers to the proxy's own
queries dropped (or read), answers to work the proxy skipped written by it, in order.
"""

from __future__ import annotations

from pgfleet.pgwire import messages as m
from pgfleet.pgwire.protocol import BackendMsg, TransactionStatus, byte, kinds

from .client_state import ClientPhase, ClientState
from .expect import DROP, EXP_QUERY, PROBE, PSYNC, SYNC, SYNTH, Expect, emit_synth

#: the types the hot loops test, bound as plain ints (an enum attribute lookup costs ~6x a global's)
_READY = int(BackendMsg.READY_FOR_QUERY)
_PARAMETER_STATUS = int(BackendMsg.PARAMETER_STATUS)
_ERROR = int(BackendMsg.ERROR_RESPONSE)
_IDLE = int(TransactionStatus.IDLE)
_IDLE_STATUS = byte(TransactionStatus.IDLE)
_from_bytes = int.from_bytes
#: server messages that may come at any time, whatever was asked
_ASYNC = kinds(BackendMsg.NOTICE_RESPONSE, BackendMsg.PARAMETER_STATUS, BackendMsg.NOTIFICATION_RESPONSE)
#: of the answers to its own queries, what the proxy reads
_PROXY_READS = kinds(BackendMsg.ERROR_RESPONSE, BackendMsg.DATA_ROW, BackendMsg.READY_FOR_QUERY)


class ServerWalk(ClientState):
    """Server -> client (a part of PooledClient)."""

    def from_server(self, data: bytes) -> None:
        queue = self.queue
        sf = self._sframe
        if (len(queue) == 1 and queue[0] is EXP_QUERY and not sf.skip and not sf.head
                and sf.whole is None and self.transport is not None):
            # the fast path: the answer to one simple Query, whole messages, ReadyForQuery (if
            # it came) last and no ParameterStatus to record; anything else takes the walk
            pos, end, ready = 0, len(data), -1
            while end - pos >= 5:
                kind = data[pos]
                if kind == _READY:
                    ready = pos
                elif kind == _PARAMETER_STATUS:
                    break
                nxt = pos + 1 + _from_bytes(data[pos + 1 : pos + 5], "big")
                if nxt < pos + 5:
                    break
                pos = nxt
            if pos == end and (ready < 0 or ready == end - 6):
                self.transport.write(data)
                if ready >= 0:
                    self.pool.queries += 1
                    queue.popleft()
                    self.in_tx = data[ready + 5] != _IDLE
                    self._transaction_done()
                return
        out: list[bytes] = []
        if sf.whole is not None:  # a message the proxy reads whole
            buf, data = sf.gather(data)
            if buf is None:
                return
            if not self._walk_server(bytes(buf), out):
                return
        elif sf.skip or sf.head:  # carried from the last read (the common case has nothing: no call)
            passing, data = sf.resume(data)
            if passing:  # the rest of a message passing (or dropped) as it arrives
                if not data:
                    if not sf.drop and self.transport is not None:
                        self.transport.write(passing)
                    return
                if not sf.drop:
                    out.append(passing)
        if data and not self._walk_server(data, out):
            return
        if self.transport is not None and out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if self._ready:
            self._ready = False
            self._transaction_done()

    def _walk_server(self, data: bytes, out: list[bytes]) -> bool:
        """Walk the server's messages in place: runs of messages the client should see are
        written as slices of what arrived (usually the whole read, uncopied); a message that
        does not end in this read streams on in the next, unless the proxy must read it.
        False when the session ended."""
        queue = self.queue
        pos, run, end = 0, 0, len(data)
        while end - pos >= 5:
            kind = data[pos]
            mend = pos + 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
            if mend < pos + 5:
                out.append(data[run:pos])
                self._write(out)
                self._fatal("08P01", "the database broke the protocol: message length below 4")
                return False
            if queue:
                head = queue[0]
                hk = head.kind
                own = head.own
            else:
                head, hk, own = None, -1, False
            if own:  # the proxy's own query: nothing reaches the client
                out.append(data[run:pos])
                run = mend
                if kind in _PROXY_READS:
                    if mend > end:
                        return self._gather_server(data, pos, mend, out)
                    if not self._proxy_reply(head, kind, data[pos + 5 : mend], out):
                        return False
                elif mend > end:
                    self._sframe.skip, self._sframe.drop = mend - end, True
                    return True
                pos = mend
                continue
            if mend > end and (kind == _READY or kind == _PARAMETER_STATUS):  # read whole: gather it
                out.append(data[run:pos])
                return self._gather_server(data, pos, mend, out)
            if kind in _ASYNC:
                if kind == _PARAMETER_STATUS:  # the session's parameters changed
                    self._parameter_status(data[pos + 5 : mend])
            else:
                if hk == SYNTH:
                    out.append(data[run:pos])
                    emit_synth(queue, out)
                    run = pos
                    head = queue[0] if queue else None
                    hk = head.kind if head is not None else -1
                if kind == _ERROR:  # the server now skips to the next Sync
                    while queue and queue[0].kind != SYNC:
                        e = queue.popleft()
                        if e.on_error is not None:
                            e.on_error()
                elif head is not None:
                    if hk == DROP:
                        out.append(data[run:pos])
                        run = mend
                    if kind in head.ends:
                        queue.popleft()
                if kind == _READY:
                    self.pool.queries += 1
                    self.in_tx = data[pos + 5] != _IDLE
                    self._ready = True
                    if queue and queue[0].kind == SYNTH:
                        out.append(data[run:mend])
                        emit_synth(queue, out)
                        run = mend
            if mend > end:  # the rest streams on in the next reads
                self._sframe.skip = mend - end
                self._sframe.drop = run > pos
                pos = end
                break
            pos = mend
        self._sframe.finish(data, run, pos, out)
        return True

    def _gather_server(self, data: bytes, pos: int, mend: int, out: list[bytes]) -> bool:
        """Start gathering a server message the proxy reads whole (bounded: the server
        is the tenant's, and a tenant with code execution may answer anything)."""
        if mend - pos > 1 + self.pool.max_read_whole:
            self._write(out)
            self._fatal("08P01", f"the database sent a message of {mend - pos} bytes the proxy must read whole")
            return False
        self._sframe.start_whole(data, pos, mend)
        return True

    def _proxy_reply(self, head: Expect, kind: int, body: bytes, out: list[bytes]) -> bool:
        if kind == BackendMsg.ERROR_RESPONSE:
            if self._proxy_error is None:
                self._proxy_error = body
        elif kind == BackendMsg.DATA_ROW:
            if head.kind == PROBE:
                self._probe_row(head.payload, body)
        else:  # ReadyForQuery
            self.queue.popleft()
            self.in_tx = body[:1] != _IDLE_STATUS
            error, self._proxy_error = self._proxy_error, None
            if error is not None:
                self._unsure = True  # the connection's parameters are unknown: it is not reused
                if head.kind == PSYNC:
                    fields = m.parse_error_fields(error)
                    self._write(out)
                    if self.phase is ClientPhase.CLOSING:
                        self._drop_server(discard=True)
                    self._fatal(fields.get("C", "08006"), "could not give a server connection this session's "
                                f"parameters: {fields.get('M', 'error')}")
                    return False
            self._ready = True
            if self.queue and self.queue[0].kind == SYNTH:
                emit_synth(self.queue, out)
        return True

    def _write(self, out: list[bytes]) -> None:
        if self.transport is not None and out:
            self.transport.write(b"".join(out))
        out.clear()
