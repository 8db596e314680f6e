"""The microvm isolation driver: every database in its own QEMU microVM.

Life of an instance (all files in spec.home, see vmm.VmFiles):
  create   copy a template snapshot (RAM file, data disk, device state), restore it, reseed the
           guest's clock and RNG, create the tenant role. Never a cold boot per database.
  suspend  stream device state (~50 KB) to `vmstate`; guest RAM stays in its file
           (x-ignore-shared); QEMU ends: no process, no RAM left, only sparse files.
  start    restore from `vmstate` if there is one (it exists only while a valid snapshot
           does), else cold boot from the data disk (Postgres runs crash recovery).
  stop     clean shutdown through the guest init; RAM file and snapshot removed.
The invariant that keeps data safe: `vmstate` is renamed into place only after a completed
migration and deleted as soon as a restored guest runs, so RAM file + disk + state always
form one consistent snapshot, or there is no snapshot and the disk alone is the truth.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pgfleet.drivers.base import Backend, Driver, DriverError, DriverUnavailable, ExitCallback, InstanceSpec
from pgfleet.drivers.roles import check_role_name, tenant_role_sql
from pgfleet.pgwire.client import AdminConnection, QueryError

from . import network, vmm
from .common import CONTROL_PORT, GUEST_ADDR, PG_PORT, QEMU, cache_dir, content_hash
from .image import DEFAULT_IMAGE, Image, build_image, register_user, unregister_user
from .probe import kvm_works
from .snapshot import (allocated_bytes, copy_sparse, drop_snapshot, mark_unsynced,
                       snapshot_usable, sync_snapshot, unlink_quiet)

log = logging.getLogger("pgfleet.drivers.microvm")

TEMPLATE_FORMAT = "pgfleet-microvm-template-v2"


@dataclass(frozen=True)
class Template:
    dir: Path
    memory_mb: int
    vcpus: int

    @property
    def files(self) -> vmm.VmFiles:
        return vmm.VmFiles(self.dir)


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("microvm background work failed: %s", task.exception())


def _flock(path: Path):
    f = open(path, "w")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f  # closing it releases the lock


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


class GuestCommandError(DriverError):
    """The guest init answered a control command with an error."""


class MicroVMDriver(Driver):
    """Postgres in QEMU microVMs, restored from per-image templates, suspended to files."""

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
        self.clone_pool = clone_pool
        self._pool_fill: dict[str, asyncio.Future] = {}
        self.image: Image | None = None
        self._vms: dict[str, tuple[InstanceSpec, vmm.Vm]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._template_lock = asyncio.Lock()
        self._templates: dict[tuple[int, int], Template] = {}
        self._syncs: dict[str, asyncio.Task] = {}  # uuid -> background fsync of its snapshot
        self._netns_ok: set[str] = set()
        # uuid -> kept control connection to the guest init (see _control)
        self._ctl: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
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
        if self.accel is None:
            self.accel = "kvm" if await asyncio.to_thread(kvm_works) else "tcg"
            if self.accel == "tcg":
                log.warning("KVM cannot run a guest on this host: microVMs run under TCG "
                            "emulation (~1% of native CPU speed)")
        tpl = await self._template(self.template_memory_mb, 1)
        self._refill_pool(tpl)

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
        register_user(image, spec.uuid, spec.home)
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

    def _template_key(self, memory_mb: int, vcpus: int) -> str:
        assert self.image is not None
        qemu_version = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
        return content_hash([TEMPLATE_FORMAT, self.image.key, qemu_version, str(self.accel),
                             str(memory_mb), str(vcpus), self.image.cmdline(),
                             " ".join(vmm.qemu_argv(self._machine(memory_mb, vcpus),
                                                    vmm.VmFiles(Path("/")), tap_fd=0, qmp_fd=0,
                                                    incoming=False))])

    async def _template(self, memory_mb: int, vcpus: int) -> Template:
        """The template snapshot for this machine shape, booting one VM to make it if needed."""
        have = self._templates.get((memory_mb, vcpus))
        if have is not None and (have.dir / "template.json").exists():
            return have  # (gone if someone pruned it: then it is made again)
        async with self._template_lock:
            key = self._template_key(memory_mb, vcpus)
            final = self.cache / "templates" / key
            if not (final / "template.json").exists():
                # Another daemon (or a benchmark) on this host may be making the same one.
                (self.cache / "templates").mkdir(parents=True, exist_ok=True)
                lock = await asyncio.to_thread(_flock, self.cache / "templates" / ".lock")
                try:
                    if not (final / "template.json").exists():
                        await self._make_template(final, memory_mb, vcpus)
                finally:
                    lock.close()
            tpl = Template(final, memory_mb, vcpus)
            self._templates[(memory_mb, vcpus)] = tpl
            return tpl

    async def _make_template(self, final: Path, memory_mb: int, vcpus: int) -> None:
        assert self.image is not None
        t0 = time.perf_counter()
        (self.cache / "templates").mkdir(parents=True, exist_ok=True)
        tmp = self.cache / "templates" / f".build-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files = vmm.VmFiles(tmp)
        ns = f"pgf-tpl-{os.getpid()}"
        vm: vmm.Vm | None = None
        try:
            await asyncio.to_thread(copy_sparse, self.image.data, files.data)
            await asyncio.to_thread(network.ensure, ns)
            cfg = dataclasses.replace(self._machine(memory_mb, vcpus), template=True)
            vm = await self._spawn(cfg, files, ns, incoming=False)
            vm.watch(lambda v: None)
            await vmm.set_snapshot_caps(vm)
            backend = Backend(host=GUEST_ADDR, port=PG_PORT, netns=ns)
            await self._wait_ready(vm, backend, self.boot_timeout)
            # Warm the guest page cache with what personalising and first queries touch,
            # and write a checkpoint so a clone's crash recovery has little to replay.
            conn = await self._admin(backend)
            try:
                await conn.query("SELECT count(*) FROM pg_class; SELECT count(*) FROM pg_roles; "
                                 "CHECKPOINT")
            finally:
                await conn.close()
            # The admin session held by init is part of the snapshot: clones are personalised
            # through it with no TCP handshake and no backend fork. Warm its caches with the
            # very statements personalising runs, rolled back.
            await self._control(ns, [b"A", self._sql_command(
                "BEGIN; " + tenant_role_sql("pgfleet_warmup") + "; ROLLBACK")])
            token = await self._save(vm, files)
            # Templates outlive host reboots: make them durable before anyone copies them.
            await asyncio.to_thread(sync_snapshot, files.state, [files.ram, files.data], token)
            meta = {"memory_mb": memory_mb, "vcpus": vcpus, "image": self.image.key,
                    "accel": self.accel, "made_in_s": round(time.perf_counter() - t0, 2),
                    "created_at": time.time()}
            (tmp / "template.json").write_text(json.dumps(meta, indent=2))
            for junk in (files.qmp, files.pid, files.qemu_log):
                unlink_quiet(junk)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            log.info("microvm template %s made in %.1f s", final.name, time.perf_counter() - t0)
        except BaseException as exc:
            console = vmm.tail(files.console)
            if vm is not None:
                await vm.kill()
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, DriverError):
                raise DriverError(f"making the microvm template failed: {exc}; console: {console}") from exc
            raise
        finally:
            await asyncio.to_thread(network.delete, ns)

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
        return Backend(host=GUEST_ADDR, port=PG_PORT, netns=self._netns(spec))

    def log_path(self, spec: InstanceSpec) -> Path:
        """The guest's serial console: kernel, init and Postgres server log."""
        return vmm.VmFiles(spec.home).console

    def _running(self, spec: InstanceSpec) -> vmm.Vm | None:
        entry = self._vms.get(spec.uuid)
        if entry is None or not entry[1].alive():
            return None
        return entry[1]

    async def _spawn(self, cfg: vmm.MachineConfig, files: vmm.VmFiles, ns: str, *,
                     incoming: bool, timings: dict[str, float] | None = None) -> vmm.Vm:
        tap = network.open_tap(ns)
        try:
            return await vmm.spawn(cfg, files, tap, incoming=incoming, timings=timings)
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
            self._drop_ctl(spec)
        asyncio.ensure_future(vm.close_qmp())
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

    async def _admin(self, backend: Backend, timeout: float = 10.0) -> AdminConnection:
        async def connect() -> AdminConnection:
            reader, writer = await backend.open_connection()
            return await AdminConnection.open(reader, writer, backend.admin_user)
        return await asyncio.wait_for(connect(), timeout)

    async def _wait_ready(self, vm: vmm.Vm, backend: Backend, timeout: float) -> None:
        """Poll until Postgres in the guest answers SELECT 1, failing fast if QEMU exits."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not vm.alive():
                raise DriverError(f"the guest stopped while booting ({vm.exit_reason}); "
                                  f"console: {vmm.tail(vm.files.console)}")
            try:
                conn = await self._admin(backend, timeout=1.0)
                try:
                    await conn.query("SELECT 1")
                    return
                finally:
                    await conn.close()
            except (OSError, asyncio.TimeoutError, QueryError, EOFError,
                    asyncio.IncompleteReadError) as exc:
                last = exc  # not up yet: no route, refused, "starting up"
            await asyncio.sleep(0.05)
        raise DriverError(f"Postgres in the guest was not ready after {timeout:.0f} s "
                          f"(last error: {last!r}); console: {vmm.tail(vm.files.console)}")

    async def _control(self, ns: str, commands: list[bytes], timeout: float = 10.0,
                       keep_for: str | None = None) -> None:
        """Commands to the guest init's control port on one connection (see guest/init.c).

        With keep_for (an instance uuid) the connection is kept and reused next time: it
        survives suspend/resume like any TCP session into the guest, so a wake's reseed
        needs no handshake. A dead kept connection (e.g. after a cold boot) falls back to a
        fresh one; only idempotent commands are ever sent on a reused connection.
        """
        kept = self._ctl.pop(keep_for, None) if keep_for else None
        if kept is not None:
            try:
                answers = await asyncio.wait_for(self._exchange(*kept, commands), timeout)
            except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                kept[1].close()
            else:
                self._ctl[keep_for] = kept  # type: ignore[index]
                return self._check(commands, answers)

        async def fresh() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, list[bytes]]:
            reader, writer = await Backend(host=GUEST_ADDR, port=CONTROL_PORT,
                                           netns=ns).open_connection()
            try:
                return reader, writer, await self._exchange(reader, writer, commands)
            except BaseException:
                writer.close()
                raise

        reader, writer, answers = await asyncio.wait_for(fresh(), timeout)
        if keep_for and all(a == b"ok\n" for a in answers):
            self._ctl[keep_for] = (reader, writer)
        else:
            writer.close()
        self._check(commands, answers)

    @staticmethod
    async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        commands: list[bytes]) -> list[bytes]:
        writer.write(b"".join(commands))  # pipelined: one round trip for all
        await writer.drain()
        answers = []
        for _ in commands:
            line = await reader.readline()
            if not line:
                raise EOFError("guest init closed the control connection")
            answers.append(line)
        return answers

    @staticmethod
    def _check(commands: list[bytes], answers: list[bytes]) -> None:
        for command, answer in zip(commands, answers):
            if answer != b"ok\n":
                raise GuestCommandError(
                    f"guest init refused {command[:1]!r}: {answer.decode(errors='replace').strip()}")

    def _drop_ctl(self, spec: InstanceSpec) -> None:
        kept = self._ctl.pop(spec.uuid, None)
        if kept is not None:
            kept[1].close()

    @staticmethod
    def _reseed_command() -> bytes:
        """Set the guest clock to now and reseed its CRNG with host randomness.

        A restored guest's clock is where the snapshot left it, and every clone of a template
        starts with the same RNG state: both are fixed before anyone else talks to it.
        """
        now = time.time_ns()
        return b"R" + struct.pack("<qq", now // 10**9, now % 10**9) + os.urandom(64)

    @staticmethod
    def _sql_command(sql: str) -> bytes:
        data = sql.encode()
        return b"Q" + struct.pack("<I", len(data)) + data

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
                               incoming=True, timings=timings)
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
            await self._control(ns, [self._reseed_command(), *(then or [])], keep_for=spec.uuid)
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
        self._drop_ctl(spec)  # its guest end died with the old guest
        drop_snapshot(files.state)
        unlink_quiet(files.ram)  # a fresh, empty RAM file: nothing of the old run is reused
        assert self.image is not None
        self._record(spec, self.image)  # a cold boot may move to the current image
        vm = await self._spawn(self._machine(spec.memory_mb, spec.vcpus), files, ns,
                               incoming=False, timings=timings)
        self._attach(spec, vm)
        try:
            await vmm.set_snapshot_caps(vm)
            await self._wait_ready(vm, self.backend(spec), self.boot_timeout)
            await self._control(ns, [self._reseed_command()], keep_for=spec.uuid)
        except BaseException:
            await vm.kill()
            raise
        return vm

    async def _personalise(self, spec: InstanceSpec) -> None:
        """The tenant's own role (pgfleet.drivers.roles), owning the database and schema public."""
        conn = await self._admin(self.backend(spec))
        try:
            await conn.query(tenant_role_sql(spec.role))
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
                if await asyncio.to_thread(self._take_pooled, tpl, files):
                    timings["pool_take_ms"] = (time.perf_counter() - t1) * 1000
                else:
                    await asyncio.to_thread(self._copy_template, tpl.files, files)
                    timings["copy_ms"] = (time.perf_counter() - t1) * 1000
                self._refill_pool(tpl)
                t1 = time.perf_counter()
                await self._ensure_netns(spec)
                timings["netns_ms"] = (time.perf_counter() - t1) * 1000
                assert self.image is not None
                self._record(spec, self.image)
                try:
                    await self._restore(spec, files, timings, self.image, then=[
                        self._sql_command(tenant_role_sql(spec.role)), b"X"])
                except GuestCommandError as exc:
                    if "admin session" not in str(exc):
                        raise
                    # A template without init's admin session: personalise over TCP.
                    t1 = time.perf_counter()
                    await self._personalise(spec)
                    timings["personalise_ms"] = (time.perf_counter() - t1) * 1000
            except BaseException as exc:
                await self._teardown(spec)  # no half-made instance left behind
                if isinstance(exc, (DriverError, OSError, QueryError, asyncio.TimeoutError)):
                    raise DriverError(f"creating microvm {spec.name} failed: {exc}") from exc
                raise
            vm = self._running(spec)
            if vm is None:
                raise DriverError(f"microvm {spec.name} died while being created")
            vm.established = True
            timings["total_ms"] = (time.perf_counter() - t0) * 1000
            self.last_timings = timings
            return self.backend(spec)

    # ----------------------------------------------------------------- clone pool
    #
    # Copying a template's RAM file and disk costs 30-60 ms of a clone's latency. A few
    # copies are made ahead of time, in the background, under state_dir/clone-pool; a create
    # claims one with a directory rename (atomic: two creates never get the same copy) and
    # moves its files into the instance home, which is only renames when both are on one
    # filesystem. Otherwise the pool is not used.

    def _pool_dir(self, tpl: Template) -> Path:
        return self.state_dir / "clone-pool" / tpl.dir.name

    def _take_pooled(self, tpl: Template, dst: vmm.VmFiles) -> bool:
        pool = self._pool_dir(tpl)
        try:
            if os.stat(pool).st_dev != os.stat(dst.home).st_dev:
                return False
            ready = sorted(p for p in pool.iterdir() if p.name.startswith("ready-"))
        except FileNotFoundError:
            return False
        for slot in ready:
            claimed = dst.home / ".pool-claim"
            try:
                os.rename(slot, claimed)
            except OSError:
                continue  # another create took it first
            src = vmm.VmFiles(claimed)
            if not snapshot_usable(src.state):  # copied before a host crash: maybe torn
                shutil.rmtree(claimed, ignore_errors=True)
                continue
            os.rename(src.ram, dst.ram)
            os.rename(src.data, dst.data)
            os.rename(src.console, dst.console)
            mark_unsynced(dst.state)
            os.rename(src.state, dst.state)  # the state goes last: it vouches for the others
            shutil.rmtree(claimed, ignore_errors=True)
            return True
        return False

    def _refill_pool(self, tpl: Template) -> None:
        """Top the pool up to CLONE_POOL copies in the background (one filler per template)."""
        if self.clone_pool <= 0:
            return
        running = self._pool_fill.get(tpl.dir.name)
        if running is not None and not running.done():
            return
        fill = asyncio.ensure_future(asyncio.to_thread(self._fill_pool, tpl))
        fill.add_done_callback(_log_failure)
        self._pool_fill[tpl.dir.name] = fill

    def _fill_pool(self, tpl: Template) -> None:
        pool = self._pool_dir(tpl)
        pool.mkdir(parents=True, exist_ok=True)
        os.chmod(pool, 0o700)
        for old in pool.parent.iterdir():  # copies of templates that are no longer current
            if old != pool and old.name not in {t.dir.name for t in self._templates.values()}:
                shutil.rmtree(old, ignore_errors=True)
        while sum(1 for p in pool.iterdir() if p.name.startswith("ready-")) < self.clone_pool:
            tmp = pool / f"fill-{os.getpid()}-{os.urandom(4).hex()}"
            tmp.mkdir()
            try:
                self._copy_template(tpl.files, vmm.VmFiles(tmp))
                os.rename(tmp, pool / f"ready-{time.time_ns()}-{os.urandom(2).hex()}")
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

    @staticmethod
    def _copy_template(src: vmm.VmFiles, dst: vmm.VmFiles) -> None:
        copy_sparse(src.ram, dst.ram)
        copy_sparse(src.data, dst.data)
        # The guest's boot and Postgres startup lines, so log_path() tells the whole story.
        with open(src.console, "rb") as fin, open(dst.console, "ab") as fout:
            shutil.copyfileobj(fin, fout)
            fout.write(b"--- pgfleet: restored from template snapshot ---\n")
        shutil.copyfile(src.state, dst.state_tmp)
        mark_unsynced(dst.state)
        os.rename(dst.state_tmp, dst.state)  # the state goes last: it vouches for the others

    async def start(self, spec: InstanceSpec) -> Backend:
        async with self._lock(spec):
            if self._running(spec) is not None or await self._adopt_or_clear(spec):
                return self.backend(spec)
            files = vmm.VmFiles(spec.home)
            if not files.data.exists():
                raise DriverError(f"microvm {spec.name} has no data disk at {files.data}")
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
            vm = self._running(spec)
            if vm is None:
                raise DriverError(f"microvm {spec.name} died while starting")
            vm.established = True
            timings["total_ms"] = (time.perf_counter() - t0) * 1000
            self.last_timings = timings
            return self.backend(spec)

    async def suspend(self, spec: InstanceSpec) -> None:
        async with self._lock(spec):
            vm = self._running(spec)
            if vm is None:
                return
            t0 = time.perf_counter()
            timings: dict[str, float] = {}
            token = await self._save(vm, vm.files, timings)
            self._vms.pop(spec.uuid, None)
            files = vm.files
            # Durable in the background; until then the snapshot is trusted only in this boot.
            sync = asyncio.ensure_future(asyncio.to_thread(
                sync_snapshot, files.state, [files.ram, files.data], token))
            sync.add_done_callback(_log_failure)
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
                vm.expected_exit = True
                self._drop_ctl(spec)
                try:
                    await self._control(self._netns(spec), [b"H"], timeout=60)
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
        self._drop_ctl(spec)
        entry = self._vms.pop(spec.uuid, None)
        if entry is not None:
            await entry[1].kill()
        files = vmm.VmFiles(spec.home)
        image = self._recorded_image(spec, any_accel=True)
        if image is not None:
            unregister_user(image.dir, spec.uuid)
        stray = await vmm.adopt(files)  # e.g. left by a previous daemon
        if stray is not None:
            await stray.kill()
        for path in files.owned():
            unlink_quiet(path)
            unlink_quiet(path.with_name(path.name + ".part"))
        self._netns_ok.discard(self._netns(spec))
        await asyncio.to_thread(network.delete, self._netns(spec))
        try:
            spec.home.rmdir()  # only if nothing else (the fleet's files) is in it
        except OSError:
            pass

    async def recover(self, spec: InstanceSpec) -> Backend | None:
        async with self._lock(spec):
            if self._running(spec) is not None or await self._adopt_or_clear(spec):
                return self.backend(spec)
            return None

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
            if status == "running" and network.exists(self._netns(spec)):
                vm.established = True
                self._attach(spec, vm)
                log.info("microvm %s: adopted running qemu pid %d", spec.name, vm.pid)
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

    async def usage(self, spec: InstanceSpec) -> dict[str, int]:
        vm = self._running(spec)
        files = vmm.VmFiles(spec.home)
        out = {"disk_bytes": sum(allocated_bytes(p) for p in (files.ram, files.data, files.state))}
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
        for fill in list(self._pool_fill.values()):
            try:
                await fill
            except OSError:
                pass  # logged by its done callback
        for task in list(self._syncs.values()):
            try:
                await task
            except OSError as exc:
                log.warning("syncing a snapshot failed: %s", exc)
        self._syncs.clear()
        for _, writer in self._ctl.values():
            writer.close()
        self._ctl.clear()
        for _, vm in list(self._vms.values()):
            await vm.close_qmp()
