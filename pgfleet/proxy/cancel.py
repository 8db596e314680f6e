"""CancelRequest routing: clients get keys minted by the proxy, mapped to the real backend's."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Callable

from pgfleet.drivers.base import Backend
from pgfleet.pgwire import messages as m


@dataclass(frozen=True)
class CancelTarget:
    backend: Backend
    process_id: int
    secret_key: int


class CancelRegistry:
    def __init__(self) -> None:
        self._targets: dict[tuple[int, int], CancelTarget] = {}

    def mint(self) -> tuple[int, int]:
        while True:
            key = (secrets.randbits(31), secrets.randbits(31) - (1 << 30))
            if key not in self._targets:
                self._targets[key] = None  # type: ignore[assignment]  # reserved
                return key

    def bind(self, key: tuple[int, int], target: "CancelTarget | Callable[[], CancelTarget | None] | None") -> None:
        """A fixed target (a direct session) or a function giving the current one (a pooled
        client is on a different server connection in each transaction)."""
        self._targets[key] = target  # type: ignore[assignment]

    def release(self, key: tuple[int, int]) -> None:
        self._targets.pop(key, None)

    async def cancel(self, process_id: int, secret_key: int) -> bool:
        target = self._targets.get((process_id, secret_key))
        if callable(target):
            target = target()
        if target is None:
            return False
        reader, writer = await target.backend.open_connection()
        try:
            writer.write(m.cancel_request(target.process_id, target.secret_key))
            await writer.drain()
            await reader.read()  # the server closes the connection when done
        finally:
            writer.close()
        return True
