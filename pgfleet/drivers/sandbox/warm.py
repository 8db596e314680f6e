"""The sandbox driver's warm standby: an instance's processes frozen (cgroup freezer) and, with
swap, their memory reclaimed (freeze.py). A mixin of SandboxDriver.
"""

from __future__ import annotations

from pathlib import Path

from .. import swap
from ..base import Backend, DriverError, InstanceSpec
from .. import freeze


class SandboxWarm:
    """Methods of SandboxDriver; see Driver for what each promises."""

    def warm_mode(self) -> str | None:
        if not self.keeps_sessions_across_suspend:
            return None
        return "reclaim" if swap.total_bytes() > 0 else "freeze"

    async def freeze(self, spec: InstanceSpec) -> int:
        if spec.uuid not in self._running:
            raise DriverError(f"database {spec.name} is not running")
        try:
            await self._freezer(spec).freeze()
        except freeze.FreezeFailed as exc:
            raise DriverError(f"database {spec.name} could not be frozen: {exc}") from exc
        memory = self._memory_dir(spec)
        if memory is None:
            return 0
        return await freeze.push_out(memory, self._cgroup(spec).v2, self.warm_mode() == "reclaim")

    async def reclaim_again(self, spec: InstanceSpec) -> int:
        memory = self._memory_dir(spec)
        if memory is None or spec.uuid not in self._running or not self._freezer(spec).is_frozen():
            return self.memory_charged(spec)[0]
        return await freeze.push_out(memory, self._cgroup(spec).v2, self.warm_mode() == "reclaim")

    async def thaw(self, spec: InstanceSpec) -> Backend:
        if spec.uuid not in self._running:
            raise DriverError(f"the processes of frozen database {spec.name} are gone")
        self._unfreeze(spec)
        return self.backend(spec)

    def is_frozen(self, spec: InstanceSpec) -> bool:
        return self._freezer(spec).is_frozen()

    def memory_charged(self, spec: InstanceSpec) -> tuple[int, int]:
        memory = self._memory_dir(spec)
        if memory is None or spec.uuid not in self._running:
            return 0, 0
        return freeze.charged_bytes(memory, self._cgroup(spec).v2)

    def _unfreeze(self, spec: InstanceSpec) -> None:
        """Limit first, then thaw: the thawed processes fault their pages back in at once.
        Only a frozen one: a running one has its limits already (and cgroup v1 refuses a
        memory limit above the memory+swap one, which an update changes at the next start)."""
        freezer = self._freezer(spec)
        if not freezer.is_frozen():
            return
        memory = self._memory_dir(spec)
        if memory is not None:
            freeze.restore_limit(memory, self._cgroup(spec).v2, self._limits(spec).memory_bytes)
        freezer.thaw()

    def _memory_dir(self, spec: InstanceSpec) -> Path | None:
        dirs = self._cgroup(spec).dirs
        return dirs.get("unified") or dirs.get("memory")

