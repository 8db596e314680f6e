"""The microvm driver's warm standby (a mixin of MicroVMDriver).

freeze: the VM is paused over QMP (`stop`: no vCPU runs, no guest timer fires, the guest
cannot un-pause itself: only the host's QMP socket can) and, with swap on the host, its QEMU's
memory cgroup is squeezed (drivers/freeze.py reclaim): the kernel writes the guest RAM (a
share=on file) back to that file and pushes QEMU's own anonymous memory (heap, the TCG
translation cache) to swap. Without swap it stays charged ("freeze").
thaw: the limit back first, then `cont`: the guest goes on where it stopped, and so do the
TCP sessions held into it (their peers only saw a pause).

Every QEMU runs in a cgroup of its own (memory, pids, cpu: <ctl>/pgfleet/<home tag>/<uuid>),
joined by `pgfleet-jail -j` before QEMU's exec, so it is charged for everything from its
first page on; the cgroup goes when its QEMU does.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from qemu.qmp.error import QMPError

from .. import cgroups, freeze, swap
from ..base import Backend, DriverError, InstanceSpec
from . import vmm

#: the memory QEMU needs on top of its guest's RAM: its heap, libraries and, under TCG, the
#: translation cache (tb-size). The limit only bounds a QEMU gone wrong: guest RAM pages are
#: file pages the kernel can write back, never a reason for the OOM killer
QEMU_OVERHEAD_MB = 256


class MicroVMWarm:
    """Methods of MicroVMDriver; see Driver for what each promises."""

    state_dir: Path

    # --- the cgroup of each instance's QEMU ---------------------------------------------

    def _cgroup_parent(self) -> cgroups.Cgroup:
        return cgroups.Cgroup(cgroups.CGROUP_PARENT, cgroups.home_tag(self.state_dir))

    def _cgroup(self, spec: InstanceSpec) -> cgroups.Cgroup:
        return cgroups.Cgroup(f"{cgroups.CGROUP_PARENT}/{cgroups.home_tag(self.state_dir)}", spec.uuid)

    @staticmethod
    def _limits(spec: InstanceSpec) -> cgroups.CgroupLimits:
        return cgroups.CgroupLimits(memory_bytes=(spec.memory_mb + QEMU_OVERHEAD_MB) << 20,
                                    cpu_pct=spec.cpu_pct)

    def _memory_dir(self, spec: InstanceSpec) -> Path | None:
        dirs = self._cgroup(spec).dirs
        return dirs.get("unified") or dirs.get("memory")

    # --- Driver's warm methods -----------------------------------------------------------

    def warm_mode(self) -> str | None:
        return "reclaim" if swap.total_bytes() > 0 else "freeze"

    async def freeze(self, spec: InstanceSpec) -> int:
        async with self._lock(spec):  # type: ignore[attr-defined]
            vm = self._running(spec)  # type: ignore[attr-defined]
            if vm is None:
                raise DriverError(f"microvm {spec.name} is not running")
            try:
                await asyncio.wait_for(vm.qmp.execute("stop"), freeze.FREEZE_TIMEOUT_S)
            except (QMPError, OSError, EOFError, asyncio.TimeoutError) as exc:
                raise DriverError(f"microvm {spec.name} could not be paused: {exc}") from exc
            vm.paused = True
            memory = self._memory_dir(spec)
            if memory is None:
                return 0
            return await freeze.push_out(memory, self._cgroup(spec).v2, self.warm_mode() == "reclaim")

    async def reclaim_again(self, spec: InstanceSpec) -> int:
        async with self._lock(spec):  # type: ignore[attr-defined]
            vm = self._running(spec)  # type: ignore[attr-defined]
            memory = self._memory_dir(spec)
            if vm is None or not vm.paused or memory is None:
                return self.memory_charged(spec)[0]
            return await freeze.push_out(memory, self._cgroup(spec).v2, self.warm_mode() == "reclaim")

    async def thaw(self, spec: InstanceSpec) -> Backend:
        async with self._lock(spec):  # type: ignore[attr-defined]
            vm = self._running(spec)  # type: ignore[attr-defined]
            if vm is None:
                raise DriverError(f"the QEMU of warm microvm {spec.name} is gone")
            await self._resume(spec, vm)
            return self.backend(spec)  # type: ignore[attr-defined]

    def is_frozen(self, spec: InstanceSpec) -> bool:
        vm = self._running(spec)  # type: ignore[attr-defined]
        return vm is not None and vm.paused

    def memory_charged(self, spec: InstanceSpec) -> tuple[int, int]:
        memory = self._memory_dir(spec)
        if memory is None or self._running(spec) is None:  # type: ignore[attr-defined]
            return 0, 0
        return freeze.charged_bytes(memory, self._cgroup(spec).v2)

    async def _resume(self, spec: InstanceSpec, vm: vmm.Vm) -> None:
        """Limit first, then `cont`: the guest faults its pages back in at once."""
        if not vm.paused:
            return
        memory = self._memory_dir(spec)
        if memory is not None:
            freeze.restore_limit(memory, self._cgroup(spec).v2, self._limits(spec).memory_bytes)
        try:
            await vm.qmp.execute("cont")
        except (QMPError, OSError, EOFError) as exc:
            raise DriverError(f"microvm {spec.name} could not be resumed: {exc}") from exc
        vm.paused = False
