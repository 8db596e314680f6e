"""Session parameters follow each pooled client (params.py holds their values): a server
connection whose values differ from the client's gets one simple Query of SETs ahead of
the client's messages; SET/RESET/DISCARD the server does not report are asked for when the
transaction ends; ParameterStatus updates both sides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import params as pm
from .client_state import ClientState
from .expect import EXP_PSYNC, PROBE, READY_ENDS, Expect

if TYPE_CHECKING:
    from .pool import ServerConn


class ParamFollowing(ClientState):
    """The client's session parameters (a part of PooledClient)."""

    def _sync_params(self, conn: ServerConn) -> None:
        """Pipelined ahead of the client's messages: one Query whose answers are dropped.
        The connection is taken to have the values at once; if the Query fails, the client
        is told and the connection is not reused."""
        payload, readies = self.pset.sync_from(conn.pset)
        conn.pset = self.pset
        self.pool.syncs += 1
        conn.transport.write(payload)  # type: ignore[union-attr]
        for _ in range(readies):
            self.queue.append(EXP_PSYNC)

    def _note_sql(self, data: bytes, start: int, stop: int) -> tuple | str | None:
        """SET/RESET/DISCARD ALL at the start of a statement: the parameters it may change.
        Those the server does not report are asked for when the transaction ends."""
        match = pm.SESSION_SQL.match(data, start, stop)
        if match is None:
            return None
        names = pm.session_sql_names(match)
        self._mark(names)
        return names

    def _mark(self, names: tuple | str | None) -> None:
        if names is None:
            return
        reg = self.pool.registry
        if names == pm.ALL:
            names = tuple(self.pset.values)
        for name in names:
            if not reg.is_reported(name):
                if self._dirty is None:
                    self._dirty = set()
                self._dirty.add(name)

    def _parameter_status(self, body: bytes) -> None:
        """The server reports a parameter's new value (after the client's SET, or at the end
        of a transaction that SET LOCAL it): the client wants it, the connection has it."""
        parts = body.split(b"\0")
        if len(parts) < 3:
            return
        reg = self.pool.registry
        name = reg.tracked_name(parts[0].decode("utf-8", "surrogateescape"))
        if name is None:
            return
        change = {name: parts[1].decode("utf-8", "surrogateescape")}
        self.pset = reg.with_values(self.pset, change)
        if self.server is not None:
            self.server.pset = reg.with_values(self.server.pset, change)

    def _probe(self) -> None:
        """After a transaction that ran SET/RESET on parameters the server does not report:
        ask their values (ahead of anything the client sends next, on the same connection)."""
        names = sorted(self._dirty or ())
        self._dirty = None
        self.server.transport.write(pm.probe_query(names))  # type: ignore[union-attr]
        self.queue.append(Expect(PROBE, READY_ENDS, payload=tuple(names)))

    def _probe_row(self, names: tuple[str, ...], body: bytes) -> None:
        try:
            values = pm.decode_hex_row(body)
        except ValueError:
            values = []
        if len(values) != len(names) or any(v is not None and len(v) > pm.MAX_VALUE for v in values):
            self._unsure = True  # the connection's values are unknown: it is not reused
            return
        changes = dict(zip(names, values))
        reg = self.pool.registry
        self.pset = reg.with_values(self.pset, changes)
        if self.server is not None:
            self.server.pset = reg.with_values(self.server.pset, changes)
