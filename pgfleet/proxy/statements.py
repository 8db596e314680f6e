"""Named prepared statements of pooled clients, in bounded memory.

A client's named statement must be re-preparable on whichever server connection it lands
on, so the pooler keeps its text. The text is kept once per pool however many clients
prepare it (a statement's server name is derived from its text), and every byte held is
charged to the daemon's MemoryBudget: over it, the client gets 54000, not more memory.
"""

from __future__ import annotations

import hashlib

from .guards import MemoryBudget

#: rough bytes of bookkeeping per entry (dict slot, tuple, str objects)
ENTRY_COST = 200


def server_statement_name(parse_rest: bytes) -> str:
    """The name a statement has on every server connection: from its text and types."""
    return "pgf_" + hashlib.blake2b(parse_rest, digest_size=10).hexdigest()


class SharedTexts:
    """Statement texts of one pool: server name -> [Parse rest, the parameters it SETs, references]."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self._texts: dict[str, list] = {}

    def hold(self, sname: str, rest: bytes, sets) -> tuple[bytes, object] | None:
        entry = self._texts.get(sname)
        if entry is None:
            if not self.budget.take(len(rest) + ENTRY_COST):
                return None
            entry = self._texts[sname] = [rest, sets, 0]
        entry[2] += 1
        return entry[0], entry[1]

    def drop(self, sname: str) -> None:
        entry = self._texts.get(sname)
        if entry is None:
            return
        entry[2] -= 1
        if entry[2] <= 0:
            del self._texts[sname]
            self.budget.give(len(entry[0]) + ENTRY_COST)

    def __len__(self) -> int:
        return len(self._texts)


class ClientStatements:
    """One client's statement names -> (server name, Parse rest, the parameters it SETs)."""

    __slots__ = ("shared", "_map")

    def __init__(self, shared: SharedTexts) -> None:
        self.shared = shared
        self._map: dict[str, tuple[str, bytes, object]] = {}

    def add(self, name: str, sname: str, rest: bytes, sets) -> bool:
        """False (and nothing kept) when the memory budget is exhausted."""
        budget = self.shared.budget
        if not budget.take(len(name) + ENTRY_COST):
            return False
        held = self.shared.hold(sname, rest, sets)
        if held is None:
            budget.give(len(name) + ENTRY_COST)
            return False
        self.pop(name)
        self._map[name] = (sname, held[0], held[1])
        return True

    def get(self, name: str) -> tuple[str, bytes, object] | None:
        return self._map.get(name)

    def pop(self, name: str) -> tuple[str, bytes, object] | None:
        known = self._map.pop(name, None)
        if known is not None:
            self.shared.drop(known[0])
            self.shared.budget.give(len(name) + ENTRY_COST)
        return known

    def clear(self) -> None:
        for name in list(self._map):
            self.pop(name)

    def __len__(self) -> int:
        return len(self._map)
