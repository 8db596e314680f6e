"""What the pooler expects of the server: for each request it passes on, the answer it
waits for and what to do with it (Expect), kept in order in a client's queue.

Expectations of messages forwarded unchanged are shared (they are read-only).
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Callable

from pgfleet.pgwire.framing import message
from pgfleet.pgwire.protocol import BackendMsg, FrontendMsg, kinds


class Answer(enum.IntEnum):
    """How the proxy treats the server's answer to one request (an Expect's kind). Code
    never relies on their order: `Expect.own` says whether a request is the proxy's own."""

    FWD = 0  # forwarded to the client
    DROP = 1  # dropped: a Parse the proxy sent to re-prepare a statement the client thinks exists
    SYNTH = 2  # no request was sent: the proxy writes the answer (payload) itself, in order
    SYNC = 3  # forwarded, ends with ReadyForQuery (Query, Sync, FunctionCall)
    PSYNC = 4  # the proxy's own Query setting session parameters: dropped up to its ReadyForQuery
    PROBE = 5  # the proxy's own Query asking parameter values: read, dropped up to its ReadyForQuery


FWD, DROP, SYNTH, SYNC, PSYNC, PROBE = Answer  # bound names for the walkers
#: the proxy's own queries: nothing of their answers reaches the client
OWN_QUERIES = frozenset({Answer.PSYNC, Answer.PROBE})
#: requests whose answers the proxy deals with itself (nothing the client waits for)
PROXY_KINDS = frozenset({SYNTH, PSYNC, PROBE})
#: how much of a message's body the proxy reads to decide how to pass it on
PEEK = 256


class Expect:
    """The answer the proxy expects next from the server, and what to do with it."""

    __slots__ = ("kind", "own", "ends", "payload", "on_error")

    def __init__(self, kind: Answer, ends: frozenset[int] = frozenset(), payload=b"",
                 on_error: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self.own = kind in OWN_QUERIES
        self.ends = ends
        self.payload = payload
        self.on_error = on_error


PARSE_COMPLETE = message(BackendMsg.PARSE_COMPLETE)
CLOSE_COMPLETE = message(BackendMsg.CLOSE_COMPLETE)
READY_ENDS = kinds(BackendMsg.READY_FOR_QUERY)
PARSED = kinds(BackendMsg.PARSE_COMPLETE)
#: the answers that end an Execute
EXEC_END = kinds(BackendMsg.COMMAND_COMPLETE, BackendMsg.EMPTY_QUERY_RESPONSE, BackendMsg.PORTAL_SUSPENDED)
#: a message the proxy reads whole (its expectation depends on what it holds)
NOT_FAST = Expect(FWD)
#: what the server answers to each message forwarded as it came (None: nothing); keyed by
#: plain ints, as protocol.kinds() explains
PASS_THROUGH: dict[int, Expect | None] = {int(k): v for k, v in {
    FrontendMsg.QUERY: Expect(SYNC, READY_ENDS),
    FrontendMsg.SYNC: Expect(SYNC, READY_ENDS),
    FrontendMsg.FUNCTION_CALL: Expect(SYNC, READY_ENDS),
    FrontendMsg.EXECUTE: Expect(FWD, EXEC_END),
    FrontendMsg.FLUSH: None, FrontendMsg.COPY_DATA: None, FrontendMsg.COPY_DONE: None, FrontendMsg.COPY_FAIL: None,
    # read by the proxy
    FrontendMsg.PARSE: NOT_FAST, FrontendMsg.BIND: NOT_FAST, FrontendMsg.DESCRIBE: NOT_FAST,
    FrontendMsg.CLOSE: NOT_FAST, FrontendMsg.TERMINATE: NOT_FAST,
}.items()}
EXP_QUERY = PASS_THROUGH[FrontendMsg.QUERY]
EXP_PARSE = Expect(FWD, PARSED)
EXP_BIND = Expect(FWD, kinds(BackendMsg.BIND_COMPLETE))
EXP_PARAMS = Expect(FWD, kinds(BackendMsg.PARAMETER_DESCRIPTION))
EXP_ROWS = Expect(FWD, kinds(BackendMsg.ROW_DESCRIPTION, BackendMsg.NO_DATA))
EXP_CLOSE = Expect(FWD, kinds(BackendMsg.CLOSE_COMPLETE))
EXP_PSYNC = Expect(PSYNC, READY_ENDS)


def emit_synth(queue: deque[Expect], out: list[bytes]) -> None:
    """The answers the proxy writes itself, now due (at the head of the queue)."""
    while queue and queue[0].kind == SYNTH:
        out.append(queue.popleft().payload)
