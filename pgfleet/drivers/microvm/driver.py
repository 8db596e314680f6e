"""The microvm isolation driver: every database in its own QEMU microVM.

Life of an instance (all files in spec.home, see vmm.VmFiles):
  create   copy a template snapshot (RAM file, device state; the data disk is a qcow2 overlay
           over the template's, see qcow2.py), restore it, reseed the guest's clock and RNG,
           create the tenant role. Never a cold boot per database.
  suspend  stream device state (~50 KB) to `vmstate`; guest RAM stays in its file
           (x-ignore-shared); QEMU ends: no process, no RAM left, only sparse files.
  start    restore from `vmstate` if there is one (it exists only while a valid snapshot
           does), else cold boot from the data disk (Postgres runs crash recovery).
  stop     clean shutdown through the guest init; RAM file and snapshot removed.
  freeze   warm standby (warm.py): paused over QMP, its QEMU's memory reclaimed; thaw resumes it.
The invariant that keeps data safe: `vmstate` is renamed into place only after a completed
migration and deleted as soon as a restored guest runs, so RAM file + disk + state always
form one consistent snapshot, or there is no snapshot and the disk alone is the truth.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from pgfleet.drivers.base import Backend, Driver, DriverError, DriverUnavailable, ExitCallback, InstanceSpec
from pgfleet.drivers.roles import MAINTENANCE_DATABASE, DatabaseNames, check_role_name, personalise_sql
from pgfleet.pgwire.client import QueryError

from ..cgroups import favor_migrations
from ..jail import ensure_jail
from . import network, vmm
from .clonepool import ClonePool, Template, copy_template, log_failure
from .common import GUEST_ADDR, PG_PORT, QEMU, cache_dir
from .guest import GuestCommand, GuestCommandError, GuestControl, NoAdminSession, admin, sql_command
from .image import DEFAULT_IMAGE, Image, build_image, register_user
from .machine import VmPlumbing, disk_template
from .probe import kvm_works
from .snapshot import allocated_bytes, drop_snapshot, snapshot_usable, sync_snapshot, unlink_quiet
from .templates import TemplateMaker
from .warm import MicroVMWarm

log = logging.getLogger("pgfleet.drivers.microvm")

__all__ = ["MicroVMDriver", "GuestCommandError", "NoAdminSession", "Template", "memory_breakdown"]


def memory_breakdown(pid: int, ram: Path) -> dict[str, int]:
    """RSS and PSS of a QEMU process, with PSS split three ways (from /proc/PID/smaps):

    pss_guest_ram_bytes  the guest RAM file mapping: guest pages touched since (re)start
    pss_tcg_bytes        the TCG translation cache (the one anonymous executable mapping);
                         it does not exist under KVM
    pss_qemu_bytes       everything else: QEMU's heap, stacks, its binary and libraries
                         (shared pages divided among the processes mapping them)
    """
    rss = pss = ram_pss = tcg_pss = 0
    kind = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                fields = line.split(None, 5)
                path = fields[5].strip() if len(fields) > 5 else ""
                kind = "ram" if path == str(ram) else \
                    "tcg" if not path and "x" in fields[1] else "qemu"
            elif line.startswith("Pss:"):
                kb = int(line.split()[1])
                pss += kb
                ram_pss += kb if kind == "ram" else 0
                tcg_pss += kb if kind == "tcg" else 0
            elif line.startswith("Rss:"):
                rss += int(line.split()[1])
    return {"rss_bytes": rss * 1024, "pss_bytes": pss * 1024,
            "pss_guest_ram_bytes": ram_pss * 1024, "pss_tcg_bytes": tcg_pss * 1024,
            "pss_qemu_bytes": (pss - ram_pss - tcg_pss) * 1024}


class MicroVMDriver(MicroVMWarm, TemplateMaker, VmPlumbing, Driver):
    """Postgres in QEMU microVMs, restored from per-image templates, suspended to files.
    Templates (templates.py), each instance's QEMU and snapshot files (machine.py), the
    guest's control port (guest.py) and the clone pool (clonepool.py) live apart."""

    name = "microvm"
    keeps_sessions_across_suspend = True

    def __init__(
        self,
        state_dir: Path,
        on_exit: ExitCallback | None = None,
        *,
        image: str = DEFAULT_IMAGE,
        cache: Path | None = None,
        accel: str | None = None,  # "kvm" | "tcg" | None = probe
        template_memory_mb: int = 128,
        boot_timeout: float = 120.0,
        clone_pool: int = 2,  # template copies kept ready per template (0: copy on create)
    ) -> None:
        super().__init__(state_dir, on_exit)
        self.image_name = image
        self.cache = cache or cache_dir()
        self.accel = accel
        self.template_memory_mb = template_memory_mb
        self.boot_timeout = boot_timeout
        self.pool = ClonePool(state_dir / "clone-pool", clone_pool, lambda: self._templates.values())
        self.image: Image | None = None
        self.jail: Path | None = None
        self._vms: dict[str, tuple[InstanceSpec, vmm.Vm]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._template_lock = asyncio.Lock()
        self._templates: dict[tuple[int, int], Template] = {}
        self._syncs: dict[str, asyncio.Task] = {}  # uuid -> background fsync of its snapshot
        self._netns_ok: set[str] = set()
        self.guest = GuestControl()
        self.databases = DatabaseNames()  # the name of each instance's database inside
        #: mechanism costs of the most recent create/start/suspend, in ms (for the benchmark)
        self.last_timings: dict[str, float] = {}

    # ----------------------------------------------------------------- setup

    async def prepare(self) -> None:
        """Build (or find cached) the image, pick the accelerator, make the default template.

        First run on a host: ~4 min kernel build + ~5 s template boot; afterwards ~0.1 s.
        """
        if os.geteuid() != 0:
            raise DriverUnavailable("the microvm driver needs root (network namespaces, TAP "
                                    "devices, QEMU dropping to nobody)")
        if shutil.which(QEMU) is None:
            raise DriverUnavailable(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
        if not Path("/dev/net/tun").exists():
            raise DriverUnavailable("/dev/net/tun is missing: VMs need a TAP device")
        self.image = await asyncio.to_thread(build_image, self.image_name, self.cache)
        self.jail = await ensure_jail(self.cache)
        log.info("%s", await asyncio.to_thread(favor_migrations))  # QEMU joins its cgroups at each start
        if self.accel is None:
            self.accel = "kvm" if await asyncio.to_thread(kvm_works) else "tcg"
            if self.accel == "tcg":
                log.warning("KVM cannot run a guest on this host: microVMs run under TCG "
                            "emulation (~1% of native CPU speed)")
        tpl = await self._template(self.template_memory_mb, 1)
        self.pool.refill(tpl)

    # ----------------------------------------------------------------- helpers

    def _lock(self, spec: InstanceSpec) -> asyncio.Lock:
        return self._locks.setdefault(spec.uuid, asyncio.Lock())

    @staticmethod
    def _netns(spec: InstanceSpec) -> str:
        return network.netns_name(spec.slot)

    async def _ensure_netns(self, spec: InstanceSpec) -> None:
        """Make sure the namespace and TAP exist; verified once per daemon, then by a stat
        (the `ip` checks cost ~5 ms, on every wake otherwise)."""
        ns = self._netns(spec)
        if ns in self._netns_ok and network.exists(ns):
            return
        await asyncio.to_thread(network.ensure, ns)
        self._netns_ok.add(ns)

    def backend(self, spec: InstanceSpec) -> Backend:
        return Backend(host=GUEST_ADDR, port=PG_PORT, netns=self._netns(spec), database=self.databases.inside(spec))

    def log_path(self, spec: InstanceSpec) -> Path:
        """The guest's serial console: kernel, init and Postgres server log."""
        return vmm.VmFiles(spec.home).console

    async def _personalise(self, spec: InstanceSpec, sql: str) -> None:
        """personalise_sql over TCP, from the maintenance database (the tenant's is renamed)."""
        conn = await admin(replace(self.backend(spec), database=MAINTENANCE_DATABASE))
        try:
            await conn.query(sql)
        finally:
            await conn.close()

    # ----------------------------------------------------------------- lifecycle

    async def create(self, spec: InstanceSpec) -> Backend:
        try:
            check_role_name(spec.role)
        except ValueError as exc:
            raise DriverError(str(exc)) from None
        async with self._lock(spec):
            if self._running(spec) is not None:
                return self.backend(spec)
            t0 = time.perf_counter()
            timings: dict[str, float] = {}
            tpl = await self._template(spec.memory_mb, spec.vcpus)
            spec.home.mkdir(parents=True, exist_ok=True)
            files = vmm.VmFiles(spec.home)
            try:
                t1 = time.perf_counter()
                if await asyncio.to_thread(self.pool.take, tpl, files):
                    timings["pool_take_ms"] = (time.perf_counter() - t1) * 1000
                else:
                    await asyncio.to_thread(copy_template, tpl.files, files)
                    timings["copy_ms"] = (time.perf_counter() - t1) * 1000
                self.pool.refill(tpl)
                template = disk_template(files)
                if template is not None:  # its image must outlive this database's disk
                    register_user(template, spec.uuid, spec.home)
                t1 = time.perf_counter()
                await self._ensure_netns(spec)
                timings["netns_ms"] = (time.perf_counter() - t1) * 1000
                assert self.image is not None
                self._record(spec, self.image)
                # the tenant's role, and the database inside named after the database
                sql = personalise_sql(spec.role, spec.name)
                try:
                    await self._restore(spec, files, timings, self.image,
                                        then=[sql_command(sql), GuestCommand.ADMIN_CLOSE])
                except NoAdminSession:
                    # A template without init's admin session: personalise over TCP.
                    t1 = time.perf_counter()
                    await self._personalise(spec, sql)
                    timings["personalise_ms"] = (time.perf_counter() - t1) * 1000
                self.databases.renamed(spec, spec.name)
            except BaseException as exc:
                await self._teardown(spec)  # no half-made instance left behind
                if isinstance(exc, (DriverError, OSError, QueryError, asyncio.TimeoutError)):
                    raise DriverError(f"creating microvm {spec.name} failed: {exc}") from exc
                raise
            return self._established(spec, t0, timings, "being created")

    def _established(self, spec: InstanceSpec, t0: float, timings: dict[str, float], doing: str) -> Backend:
        """The end of a create or start: the VM is up and from now on its exit is news."""
        vm = self._running(spec)
        if vm is None:
            raise DriverError(f"microvm {spec.name} died while {doing}")
        vm.established = True
        timings["total_ms"] = (time.perf_counter() - t0) * 1000
        self.last_timings = timings
        return self.backend(spec)

    async def start(self, spec: InstanceSpec) -> Backend:
        async with self._lock(spec):
            if self._running(spec) is not None or await self._adopt_or_clear(spec):
                return self.backend(spec)
            files = vmm.VmFiles(spec.home)
            if not files.disk.exists():
                raise DriverError(f"microvm {spec.name} has no data disk at {files.disk}")
            vmm.check_backing(files)  # before anything is dropped or started
            t0 = time.perf_counter()
            timings: dict[str, float] = {}
            self._syncs.pop(spec.uuid, None)  # a running fsync is harmless, and not waited for
            await self._ensure_netns(spec)
            if files.state.exists() and not snapshot_usable(files.state):
                log.warning("%s: snapshot predates a host crash and was never synced; "
                            "cold booting from its disk", spec.name)
                drop_snapshot(files.state)
            image = self._recorded_image(spec)
            if files.state.exists() and (image is None or not image.rootfs.exists()
                                         or not image.kernel.exists()):
                log.warning("%s: the image its snapshot needs is gone (or the accelerator "
                            "changed); cold booting from its disk", spec.name)
                drop_snapshot(files.state)
            if files.state.exists():
                assert image is not None
                try:
                    await self._restore(spec, files, timings, image)
                    timings["mode"] = 0.0  # restore
                except DriverError as exc:
                    # A snapshot that cannot be loaded must not strand the data: the disk
                    # alone is consistent (Postgres recovers from its WAL).
                    log.warning("restoring %s failed (%s); cold booting from its disk",
                                spec.name, exc)
                    drop_snapshot(files.state)
                    await self._cold_boot(spec, files, timings)
                    timings["mode"] = 1.0
            else:
                await self._cold_boot(spec, files, timings)
                timings["mode"] = 1.0  # cold boot
            return self._established(spec, t0, timings, "starting")

    async def suspend(self, spec: InstanceSpec) -> None:
        async with self._lock(spec):
            vm = self._running(spec)
            if vm is None:
                return
            t0 = time.perf_counter()
            timings: dict[str, float] = {}
            # warm -> cold: resumed first (its limit back for the migration), since a snapshot
            # of a paused guest would restore paused (QEMU keeps the run state in it)
            await self._resume(spec, vm)
            token = await self._save(vm, vm.files, timings)
            self._vms.pop(spec.uuid, None)
            files = vm.files
            # Durable in the background; until then the snapshot is trusted only in this boot.
            sync = asyncio.ensure_future(asyncio.to_thread(
                sync_snapshot, files.state, [files.ram, files.disk], token))
            sync.add_done_callback(log_failure)
            self._syncs[spec.uuid] = sync
            # The namespace stays: host sockets held into the guest live there.
            timings["total_ms"] = (time.perf_counter() - t0) * 1000
            self.last_timings = timings

    async def stop(self, spec: InstanceSpec) -> None:
        async with self._lock(spec):
            self._syncs.pop(spec.uuid, None)
            files = vmm.VmFiles(spec.home)
            vm = self._running(spec)
            image = self._recorded_image(spec)
            if vm is None and snapshot_usable(files.state) and image is not None \
                    and image.rootfs.exists():
                # Standby -> stopped: resume briefly so Postgres shuts down cleanly.
                try:
                    vm = await self._restore(spec, files, {}, image)
                except DriverError as exc:
                    log.warning("%s: could not resume for a clean stop (%s)", spec.name, exc)
                    vm = None
            if vm is not None:
                try:
                    await self._resume(spec, vm)  # a paused guest cannot shut down
                except DriverError as exc:
                    log.warning("%s: %s", spec.name, exc)
                vm.expected_exit = True
                self.guest.drop(spec.uuid)
                try:
                    await self.guest.control(self._netns(spec), [GuestCommand.HALT], timeout=60)
                except (OSError, asyncio.TimeoutError, DriverError) as exc:
                    log.warning("%s: clean shutdown failed (%s); killing the VM", spec.name, exc)
                if not await vm.wait_exit(30):
                    await vm.kill()
                await vm.close_qmp()
                self._vms.pop(spec.uuid, None)
            drop_snapshot(files.state)
            unlink_quiet(files.ram)  # a stopped instance keeps only its disk

    async def destroy(self, spec: InstanceSpec) -> None:
        async with self._lock(spec):
            await self._teardown(spec)
        self._locks.pop(spec.uuid, None)

    async def recover(self, spec: InstanceSpec) -> Backend | None:
        async with self._lock(spec):
            if self._running(spec) is not None or await self._adopt_or_clear(spec):
                return self.backend(spec)
            return None

    async def disk_bytes(self, spec: InstanceSpec) -> int | None:
        """Its data disk's allocated bytes: for a copy-on-write disk the clusters it wrote (the
        template image it reads through to is shared). A suspended VM's RAM file and device
        state are its memory, not its data: usage() counts them too."""
        return allocated_bytes(vmm.VmFiles(spec.home).disk)

    async def usage(self, spec: InstanceSpec) -> dict[str, int]:
        vm = self._running(spec)
        files = vmm.VmFiles(spec.home)
        out = {"disk_bytes": sum(allocated_bytes(p) for p in (files.ram, files.disk, files.state))}
        if vm is None:
            return out
        try:
            out.update(memory_breakdown(vm.pid, files.ram))
            stat = Path(f"/proc/{vm.pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks = os.sysconf("SC_CLK_TCK")
            out["cpu_time_ms"] = (int(stat[11]) + int(stat[12])) * 1000 // ticks
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass
        return out

    async def close(self) -> None:
        """Drop QMP sessions; VMs keep running (recover() adopts them after a restart)."""
        await self.pool.close()
        for task in list(self._syncs.values()):
            try:
                await task
            except OSError as exc:
                log.warning("syncing a snapshot failed: %s", exc)
        self._syncs.clear()
        self.guest.close()
        for _, vm in list(self._vms.values()):
            await vm.close_qmp()
        self._cgroup_parent().remove()  # only once empty: running VMs keep theirs
