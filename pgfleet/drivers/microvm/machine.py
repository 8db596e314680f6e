"""One instance's VM on the host: spawning QEMU, snapshot save and restore, cold boot,
exits, adoption after a daemon restart and teardown (a mixin of MicroVMDriver)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

from pathlib import Path

from pgfleet.drivers import cgroups
from pgfleet.drivers.base import DriverError, ExitCallback, InstanceSpec
from pgfleet.drivers.roles import DatabaseNames

from . import network, vmm
from .guest import GuestCommandError, GuestControl, reseed_command, wait_ready
from .image import Image, register_user, unregister_user
from .snapshot import drop_snapshot, mark_unsynced, unlink_quiet

log = logging.getLogger("pgfleet.drivers.microvm")


def disk_template(files: vmm.VmFiles) -> Path | None:
    """The template directory a copy-on-write data disk reads through to (None: a raw disk,
    or none recorded)."""
    if vmm.disk_format(files.disk) != "qcow2":
        return None
    backing = vmm.recorded_backing(files)
    return backing.parent if backing is not None else None


class VmPlumbing:
    """Per-instance QEMU processes and their snapshot files."""

    image: Image | None
    accel: str | None
    boot_timeout: float
    on_exit: ExitCallback
    guest: GuestControl
    databases: DatabaseNames
    _vms: dict[str, tuple[InstanceSpec, vmm.Vm]]
    _syncs: dict[str, asyncio.Task]
    _netns_ok: set[str]
    jail: Path | None  # pgfleet-jail: its -j joins QEMU's cgroups before QEMU's exec

    def _machine(self, memory_mb: int, vcpus: int, image: Image | None = None) -> vmm.MachineConfig:
        if self.image is None or self.accel is None:
            raise DriverError("microvm driver used before prepare()")
        return vmm.MachineConfig(image or self.image, memory_mb, vcpus, self.accel)

    def _record(self, spec: InstanceSpec, image: Image) -> None:
        """Remember the image (and accelerator) this instance's guest runs on."""
        files = vmm.VmFiles(spec.home)
        old = self._recorded_image(spec, any_accel=True)
        tmp = files.meta.with_name(files.meta.name + ".tmp")
        tmp.write_text(json.dumps({"image": image.to_json(), "accel": self.accel}))
        os.rename(tmp, files.meta)
        register_user(image.dir, spec.uuid, spec.home)
        if old is not None and old.dir != image.dir:
            unregister_user(old.dir, spec.uuid)

    def _recorded_image(self, spec: InstanceSpec, any_accel: bool = False) -> Image | None:
        try:
            meta = json.loads(vmm.VmFiles(spec.home).meta.read_text())
            if meta.get("accel") != self.accel and not any_accel:
                return None  # a TCG snapshot cannot resume under KVM, nor the reverse
            return Image.from_json(meta["image"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def _running(self, spec: InstanceSpec) -> vmm.Vm | None:
        entry = self._vms.get(spec.uuid)
        if entry is None or not entry[1].alive():
            return None
        return entry[1]

    async def _spawn(self, cfg: vmm.MachineConfig, files: vmm.VmFiles, ns: str, *,
                     incoming: bool, timings: dict[str, float] | None = None,
                     spec: InstanceSpec | None = None) -> vmm.Vm:
        """`spec`: an instance's VM, started in its own cgroup (warm.py); templates have none."""
        launcher = None
        if spec is not None:
            if self.jail is None:
                raise DriverError("microvm driver used before prepare()")
            cgroup = self._cgroup(spec)  # type: ignore[attr-defined]
            cgroup.create(self._limits(spec))  # type: ignore[attr-defined]
            launcher = [str(self.jail), "-j", *cgroup.procs_files(), "--"]
        tap = network.open_tap(ns)
        try:
            return await vmm.spawn(cfg, files, tap, incoming=incoming, timings=timings,
                                   launcher=launcher)
        finally:
            os.close(tap)  # QEMU holds its own copy

    def _attach(self, spec: InstanceSpec, vm: vmm.Vm) -> None:
        self._vms[spec.uuid] = (spec, vm)
        vm.watch(lambda v: self._exited(spec, v))

    def _exited(self, spec: InstanceSpec, vm: vmm.Vm) -> None:
        entry = self._vms.get(spec.uuid)
        if entry is not None and entry[1] is vm:
            del self._vms[spec.uuid]
        if not vm.expected_exit:
            self.guest.drop(spec.uuid)
        asyncio.ensure_future(vm.close_qmp())
        self._cgroup(spec).remove()  # type: ignore[attr-defined]  # empty now: nothing stays charged
        try:
            if int(vm.files.pid.read_text()) == vm.pid:
                vm.files.pid.unlink()  # no stale pid for a later start() to look up
        except (FileNotFoundError, ValueError):
            pass
        if vm.expected_exit or not vm.established:
            return  # ours, or a failure the running operation reports itself
        reason = f"{vm.exit_reason}; console: {vmm.tail(vm.files.console, 3)}"
        log.warning("microvm %s died: %s", spec.name, reason)
        try:
            self.on_exit(spec, reason)
        except Exception:  # the fleet's bug must not break our event loop callback
            log.exception("on_exit callback failed for %s", spec.name)

    async def _save(self, vm: vmm.Vm, files: vmm.VmFiles, timings: dict | None = None) -> str:
        """Snapshot a running VM into files.state and end QEMU."""
        t0 = time.perf_counter()
        fd = os.open(files.state_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            await vmm.migrate_out(vm, fd)
        finally:
            os.close(fd)
        # Migration completed: the guest is stopped and disk writes flushed, so RAM file +
        # disk + state are one consistent snapshot from here on, even if QEMU dies now.
        token = mark_unsynced(files.state)
        os.rename(files.state_tmp, files.state)
        t1 = time.perf_counter()
        vm.expected_exit = True
        try:
            await vm.qmp.execute("quit")
        except Exception:
            pass  # QEMU may close the socket before answering
        if not await vm.wait_exit(10):
            await vm.kill()
        await vm.close_qmp()
        if timings is not None:
            timings["migrate_ms"] = (t1 - t0) * 1000
            timings["quit_ms"] = (time.perf_counter() - t1) * 1000
        return token

    async def _restore(self, spec: InstanceSpec, files: vmm.VmFiles, timings: dict,
                       image: Image, then: list[bytes] | None = None) -> vmm.Vm:
        """Resume from files.state on the image it was taken with; `then`: control
        commands sent with the reseed."""
        ns = self._netns(spec)
        vm = await self._spawn(self._machine(spec.memory_mb, spec.vcpus, image), files, ns,
                               incoming=True, timings=timings, spec=spec)
        self._attach(spec, vm)
        try:
            t0 = time.perf_counter()
            fd = os.open(files.state, os.O_RDONLY | os.O_CLOEXEC)
            try:
                await vmm.migrate_in(vm, fd)
            finally:
                os.close(fd)
            # The guest runs now: its RAM diverges from the snapshot, which is void from here.
            drop_snapshot(files.state)
            t1 = time.perf_counter()
            timings["state_load_ms"] = (t1 - t0) * 1000
            await self.guest.control(ns, [reseed_command(), *(then or [])], keep_for=spec.uuid)
            timings["reseed_ms" if not then else "reseed_personalise_ms"] = \
                (time.perf_counter() - t1) * 1000
        except GuestCommandError:
            if then is None:
                await vm.kill()
            raise  # the VM runs; the caller decides (create falls back or tears down)
        except BaseException:
            await vm.kill()
            raise
        return vm

    async def _cold_boot(self, spec: InstanceSpec, files: vmm.VmFiles, timings: dict) -> vmm.Vm:
        ns = self._netns(spec)
        self.guest.drop(spec.uuid)  # its guest end died with the old guest
        drop_snapshot(files.state)
        unlink_quiet(files.ram)  # a fresh, empty RAM file: nothing of the old run is reused
        assert self.image is not None
        self._record(spec, self.image)  # a cold boot may move to the current image
        vm = await self._spawn(self._machine(spec.memory_mb, spec.vcpus), files, ns,
                               incoming=False, timings=timings, spec=spec)
        self._attach(spec, vm)
        try:
            await vmm.set_snapshot_caps(vm)
            await wait_ready(vm, self.backend(spec), self.boot_timeout)
            await self.guest.control(ns, [reseed_command()], keep_for=spec.uuid)
        except BaseException:
            await vm.kill()
            raise
        return vm

    async def _cancel_sync(self, spec: InstanceSpec) -> None:
        """Wait out a snapshot fsync still running (a thread cannot be interrupted)."""
        task = self._syncs.pop(spec.uuid, None)
        if task is not None:
            try:
                await task
            except OSError as exc:
                log.warning("%s: syncing its snapshot failed: %s", spec.name, exc)

    async def _teardown(self, spec: InstanceSpec) -> None:
        await self._cancel_sync(spec)
        self.guest.drop(spec.uuid)
        entry = self._vms.pop(spec.uuid, None)
        if entry is not None:
            await entry[1].kill()
        files = vmm.VmFiles(spec.home)
        image = self._recorded_image(spec, any_accel=True)
        if image is not None:
            unregister_user(image.dir, spec.uuid)
        template = disk_template(files)
        if template is not None:
            unregister_user(template, spec.uuid)
        stray = await vmm.adopt(files)  # e.g. left by a previous daemon
        if stray is not None:
            await stray.kill()
        self._cgroup(spec).remove()  # type: ignore[attr-defined]
        for path in files.owned():
            unlink_quiet(path)
            unlink_quiet(path.with_name(path.name + ".part"))
        self.databases.forget(spec)
        self._netns_ok.discard(self._netns(spec))
        await asyncio.to_thread(network.delete, self._netns(spec))
        try:
            spec.home.rmdir()  # only if nothing else (the fleet's files) is in it
        except OSError:
            pass

    async def _adopt_or_clear(self, spec: InstanceSpec) -> bool:
        """Take over a QEMU a previous daemon left for this instance (True if it runs and is
        now ours); otherwise end it and clear leftovers so a start() begins from a known state.
        Also guards start()/create() against a second QEMU on the same files."""
        files = vmm.VmFiles(spec.home)
        if not files.pid.exists():
            return False
        vm = await vmm.adopt(files)
        if vm is not None:
            status = (await vm.qmp.execute("query-status"))["status"]  # type: ignore[index]
            if status in ("running", "paused") and network.exists(self._netns(spec)):
                # paused: warm standby (warm.py); the fleet keeps it warm or thaws it
                vm.established, vm.paused = True, status == "paused"
                self._attach(spec, vm)
                log.info("microvm %s: adopted %s qemu pid %d", spec.name, status, vm.pid)
                return True
            if status == "postmigrate" and files.state_tmp.exists():
                mig = await vm.qmp.execute("query-migrate")
                if mig.get("status") == "completed":  # type: ignore[union-attr]
                    mark_unsynced(files.state)
                    os.rename(files.state_tmp, files.state)  # the suspend had finished
            await vm.kill()
        unlink_quiet(files.state_tmp)
        unlink_quiet(files.qmp)
        unlink_quiet(files.pid)
        return False
