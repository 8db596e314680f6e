"""One QEMU microvm process: its command line, its QMP session, its exit.

QEMU is started in its own session (a daemon restart must not take VMs down) and watched
through a pidfd, which also works for a QEMU adopted after a daemon restart (not our child).
The QMP socket is created and bound by us and handed to QEMU as a listening fd, so our client
can connect before QEMU has even started: no polling for a socket file to appear.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.error import QMPError

from pgfleet.drivers.base import DriverError
from pgfleet.drivers.untrusted import read_head, read_tail, write_root_file

from .common import GUEST_MAC, QEMU
from .image import Image

logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)  # we report errors ourselves


@dataclass(frozen=True)
class VmFiles:
    """Everything one VM keeps in its home directory."""

    home: Path

    @property
    def ram(self) -> Path:  # guest RAM (share=on): survives QEMU, sparse on disk
        return self.home / "ram"

    @property
    def data(self) -> Path:  # a raw data disk (ext4 with /pgdata): templates, older databases
        return self.home / "data.img"

    @property
    def data_cow(self) -> Path:  # a qcow2 data disk over its template's data.img (qcow2.py)
        return self.home / "data.qcow2"

    @property
    def disk(self) -> Path:
        """The data disk QEMU opens: the copy-on-write one if there is one (its name tells
        its format: see disk_format)."""
        return self.data_cow if self.data_cow.exists() else self.data

    @property
    def backing(self) -> Path:
        """The template image a copy-on-write disk reads through to, recorded by root when the
        overlay was made. The overlay's header names it too, but QEMU (the tenant, once the
        guest escapes into it) holds the overlay read-write: its header is never trusted."""
        return self.home / "data.backing"

    @property
    def state(self) -> Path:  # device state; exists only while a valid snapshot exists
        return self.home / "vmstate"

    @property
    def state_tmp(self) -> Path:
        return self.home / "vmstate.tmp"

    @property
    def qmp(self) -> Path:
        return self.home / "qmp.sock"

    @property
    def pid(self) -> Path:
        return self.home / "qemu.pid"

    @property
    def console(self) -> Path:  # guest serial console (kernel, init and postgres stderr)
        return self.home / "console.log"

    @property
    def qemu_log(self) -> Path:  # QEMU's own stderr
        return self.home / "qemu.log"

    @property
    def meta(self) -> Path:  # which image and accelerator this instance's snapshot needs
        return self.home / "microvm.json"

    def owned(self) -> list[Path]:
        return [self.ram, self.data, self.data_cow, self.backing, self.state, self.state_tmp,
                self.state.with_name(self.state.name + ".durable"), self.qmp, self.pid,
                self.console, self.qemu_log, self.meta]


def disk_format(disk: Path) -> str:
    return "qcow2" if disk.suffix == ".qcow2" else "raw"


def record_backing(files: VmFiles, image: Path) -> None:
    """Record, root-owned in the instance's home, the template image its overlay reads through to."""
    write_root_file(files.backing, f"{image.absolute()}\n")


def recorded_backing(files: VmFiles) -> Path | None:
    """The template image recorded by record_backing (None: no record)."""
    text = read_head(files.backing)
    if text is None or not text.strip():
        return None
    return Path(text.decode(errors="replace").strip())


def check_backing(files: VmFiles) -> Path | None:
    """The template image a copy-on-write disk reads through to (None: a raw disk). A
    copy-on-write disk is only half of the data: refuse to run it without its template image
    (QEMU would fail less clearly, and nothing may be written to it meanwhile)."""
    disk = files.disk
    if disk_format(disk) != "qcow2":
        return None
    backing = recorded_backing(files)
    if backing is None:
        raise DriverError(f"data disk {disk} has no record of its template image ({files.backing}): "
                          "it cannot be run (its header is not trusted to name it)")
    if not backing.exists():
        raise DriverError(f"data disk {disk} reads through to its template image {backing}, "
                          "which is missing: restore that template (same path) to use this database")
    return backing


def _opt(value: object) -> str:
    """A value inside a QEMU option string (a comma is written as two)."""
    return str(value).replace(",", ",,")


def data_disk_args(data_format: str, backing: Path | None) -> list[str]:
    """vdb: this instance's data, from the fd set (see qemu_argv). cache=none: guest writes
    reach the image before the guest sees them complete, so image + RAM file always form a
    consistent pair. (A qcow2 disk's cluster allocations are written when the guest flushes,
    as a disk cache would, and when a migration completes: a snapshot still has them all.)

    A qcow2 disk gets its backing chain spelled out (-blockdev): QEMU opens the recorded
    template image read-only and never the backing file the overlay's header names, which
    the tenant can rewrite. The device (virtio-blk on node `data`, write cache on as
    -drive's cache=none sets it) is the one a raw disk's -drive gives, so a template's
    snapshot (taken on a raw disk) restores onto either."""
    if data_format != "qcow2":
        return ["-drive", "id=data,file=/dev/fdset/1,format=raw,if=none,cache=none,aio=threads,discard=unmap",
                "-device", "virtio-blk-device,drive=data"]
    if backing is None:
        raise ValueError("a qcow2 data disk needs its recorded template image")
    return [
        # the template's image: page cached and shared by every database made from it
        "-blockdev", f"driver=file,node-name=template-file,filename={_opt(backing)},read-only=on",
        "-blockdev", "driver=raw,node-name=template,file=template-file,read-only=on",
        "-blockdev", "driver=file,node-name=data-file,filename=/dev/fdset/1,aio=threads,"
                     "cache.direct=on,discard=unmap",
        "-blockdev", "driver=qcow2,node-name=data,file=data-file,backing=template,"
                     "cache.direct=on,discard=unmap",
        "-device", "virtio-blk-device,drive=data,write-cache=on",
    ]


@dataclass(frozen=True)
class MachineConfig:
    image: Image
    memory_mb: int
    vcpus: int
    accel: str  # "kvm" or "tcg"
    template: bool = False  # booting a template: tells the guest init (see init.c)


def qemu_argv(cfg: MachineConfig, files: VmFiles, *, tap_fd: int, qmp_fd: int,
              incoming: bool, data_fds: tuple[int, int] = (-1, -1),
              data_format: str = "raw", backing: Path | None = None) -> list[str]:
    """data_fds: the data disk opened read-write and read-only by us. QEMU runs as nobody
    and cannot open the (root-only) image itself; it reopens it read-only when a snapshot
    completes and read-write when one is restored, so it needs both, as an fd set.
    backing: a qcow2 disk's template image (its recorded one, see check_backing), only ever
    read; QEMU opens it at startup, while still root (see data_disk_args)."""
    img = cfg.image
    mem = f"{cfg.memory_mb}M"
    accel = ["-accel", "kvm", "-cpu", "host"] if cfg.accel == "kvm" else [
        # tb-size: the TCG translation cache defaults to 1 GiB of virtual space; 32 MiB is
        # plenty for one small guest and bounds what it can cost in RSS.
        "-accel", f"tcg,tb-size={os.environ.get('PGFLEET_TCG_TB_MB', '32')}",
        "-cpu", os.environ.get("PGFLEET_TCG_CPU", "max"),
    ]
    argv = [
        QEMU, "-name", f"pgfleet:{files.home.name},debug-threads=on",  # readable in ps/top
        "-M", "microvm,acpi=off,x-option-roms=off,isa-serial=on,rtc=on",
        *accel,
        "-smp", str(cfg.vcpus), "-m", mem,
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        # No exec, no privilege changes from inside QEMU, even if the guest breaks out of it.
        # QEMU opens every file it needs (all 0600, root's) and then drops to `nobody`: a guest
        # that escapes into QEMU is neither root nor able to open other instances' files.
        # (elevateprivileges must allow the one setuid -runas does; after it there is no
        # privilege left to elevate to.) The sandbox forbids exec and resource changes.
        "-runas", "nobody",
        "-sandbox", "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
        # Guest RAM in a per-instance file: a suspend leaves it there (x-ignore-shared) and a
        # restore maps it again; nothing is copied through the migration stream.
        "-object", f"memory-backend-file,id=mem,size={mem},mem-path={files.ram},share=on",
        "-machine", "memory-backend=mem",
        "-kernel", str(img.kernel),
        "-append", img.cmdline() + (" pgfleet.template" if cfg.template else ""),
        # vda: the shared read-only root; host page cache serves all VMs.
        "-drive", f"id=root,file={img.rootfs},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=root",
        "-add-fd", f"fd={data_fds[0]},set=1", "-add-fd", f"fd={data_fds[1]},set=1",
        *data_disk_args(data_format, backing),
        "-netdev", f"tap,id=net0,fd={tap_fd}",
        "-device", f"virtio-net-device,netdev=net0,mac={GUEST_MAC}",
        # Free page reporting hands memory the guest frees back to the host (holes in the RAM file).
        "-device", "virtio-balloon-device,free-page-reporting=on",
        "-chardev", f"file,id=con,path={files.console},append=on",
        "-serial", "chardev:con",
        "-chardev", f"socket,id=qmp,fd={qmp_fd},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


@dataclass
class Vm:
    """A live QEMU process and our QMP session to it."""

    pid: int
    qmp: QMPClient
    files: VmFiles
    popen: subprocess.Popen | None = None  # None when adopted after a daemon restart
    expected_exit: bool = False
    established: bool = False  # create/start finished: an exit from now on is news to the fleet
    paused: bool = False  # stopped over QMP for warm standby (freeze); `cont` undoes it
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    exit_reason: str = ""
    _pidfd: int = -1

    def watch(self, on_exit: Callable[["Vm"], None]) -> None:
        """Call on_exit(vm) once the process is gone, whoever its parent is."""
        loop = asyncio.get_running_loop()
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            loop.call_soon(self._on_readable, loop, on_exit)
            return
        loop.add_reader(self._pidfd, self._on_readable, loop, on_exit)

    def _on_readable(self, loop: asyncio.AbstractEventLoop, on_exit: Callable[["Vm"], None]) -> None:
        if self._pidfd >= 0:
            loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self.exited.is_set():
            return
        self.exit_reason = self._reap()
        self.exited.set()
        on_exit(self)

    def _reap(self) -> str:
        if self.popen is None:
            return "qemu exited (adopted process; status unknown)"
        code = self.popen.wait()
        if code < 0:
            return f"qemu killed by signal {signal.Signals(-code).name}"
        return f"qemu exited with status {code}"

    def alive(self) -> bool:
        return not self.exited.is_set()

    async def wait_exit(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.exited.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def kill(self) -> None:
        """SIGKILL and wait: used when a VM must go now (destroy, failed operations)."""
        self.expected_exit = True
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if not await self.wait_exit(10):
                raise DriverError(f"qemu pid {self.pid} did not die after SIGKILL")
        await self.close_qmp()

    async def close_qmp(self) -> None:
        try:
            await self.qmp.disconnect()
        except Exception:
            # After `quit` or a kill the peer is gone; qemu.qmp may then raise anything
            # (even an AssertionError about its run state). Nothing is left to clean up.
            pass


async def spawn(cfg: MachineConfig, files: VmFiles, tap_fd: int, *, incoming: bool,
                timings: dict[str, float] | None = None, launcher: list[str] | None = None) -> Vm:
    """Start QEMU (paused for an incoming snapshot, or booting) with a connected QMP session.
    `launcher`: a command that execs QEMU's argv after it (pgfleet-jail -j joining its cgroups),
    so QEMU is spawned with no Python code between fork and exec."""
    t0 = time.perf_counter()
    listener = _bind_qmp(files.qmp)
    disk = files.disk
    try:
        backing = check_backing(files)
        data_fds = (os.open(disk, os.O_RDWR | os.O_CLOEXEC), os.open(disk, os.O_RDONLY | os.O_CLOEXEC))
    except BaseException:
        listener.close()
        raise
    argv = [*(launcher or []), *qemu_argv(cfg, files, tap_fd=tap_fd, qmp_fd=listener.fileno(),
                                          incoming=incoming, data_fds=data_fds,
                                          data_format=disk_format(disk), backing=backing)]
    log = open(files.qemu_log, "ab")
    try:
        popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            pass_fds=(tap_fd, listener.fileno(), *data_fds), start_new_session=True,
            umask=0o077,  # the RAM file and console log it creates are private
        )
    except OSError as exc:
        listener.close()
        raise DriverError(f"cannot start {QEMU}: {exc}") from exc
    finally:
        log.close()
        for fd in data_fds:
            os.close(fd)
    files.pid.write_text(str(popen.pid))
    # Our client connects to the listening socket right away; QEMU greets once it is up.
    client_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client_sock.connect(str(files.qmp))
    listener.close()  # QEMU has its own copy
    qmp = QMPClient(f"pgfleet-{files.home.name}")
    try:
        await asyncio.wait_for(qmp.connect(client_sock), timeout=30)
    except (QMPError, OSError, EOFError, asyncio.TimeoutError) as exc:
        popen.kill()
        popen.wait()
        raise DriverError(f"qemu did not come up: {exc}; {tail(files.qemu_log)}") from exc
    if timings is not None:
        timings["qemu_start_ms"] = (time.perf_counter() - t0) * 1000
    return Vm(pid=popen.pid, qmp=qmp, files=files, popen=popen)


def _bind_qmp(path: Path) -> socket.socket:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    return sock


async def adopt(files: VmFiles) -> Vm | None:
    """Re-attach to a QEMU left running by a previous daemon (None if there is none)."""
    try:
        pid = int(files.pid.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    if str(files.ram).encode() not in cmdline:
        return None  # the pid was reused by something else
    qmp = QMPClient(f"pgfleet-{files.home.name}")
    try:
        await asyncio.wait_for(qmp.connect(str(files.qmp)), timeout=5)
    except (QMPError, OSError, EOFError, asyncio.TimeoutError):
        # Alive but unreachable: it cannot be managed; end it so a start() is safe.
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return None
    return Vm(pid=pid, qmp=qmp, files=files)


async def set_snapshot_caps(vm: Vm) -> None:
    """x-ignore-shared: RAM (share=on file) is not streamed; events: MIGRATION events."""
    await vm.qmp.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "x-ignore-shared", "state": True},
        {"capability": "events", "state": True},
    ]})


async def migrate_out(vm: Vm, target_fd: int, timeout: float = 30) -> None:
    """Stream device state into target_fd; on return the VM is stopped and consistent."""
    events = EventListener(("MIGRATION",))
    with vm.qmp.listen(events):
        vm.qmp.send_fd_scm(target_fd)
        await vm.qmp.execute("getfd", {"fdname": "snap"})
        await vm.qmp.execute("migrate", {"uri": "fd:snap"})
        await _migration_done(vm, events, timeout)


async def migrate_in(vm: Vm, source_fd: int, timeout: float = 60) -> None:
    """Load device state from source_fd into a QEMU started with -incoming defer; runs the VM."""
    events = EventListener(("MIGRATION", "RESUME"))
    with vm.qmp.listen(events):
        await set_snapshot_caps(vm)
        vm.qmp.send_fd_scm(source_fd)
        await vm.qmp.execute("getfd", {"fdname": "snap"})
        await vm.qmp.execute("migrate-incoming", {"uri": "fd:snap"})
        await _migration_done(vm, events, timeout)


async def _migration_done(vm: Vm, events: EventListener, timeout: float) -> None:
    async def wait() -> None:
        while True:
            ev = await events.get()
            if ev["event"] != "MIGRATION":
                continue
            status = ev["data"]["status"]
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                info = await vm.qmp.execute("query-migrate")
                raise DriverError(f"snapshot transfer {status}: {info}; qemu: {tail(vm.files.qemu_log, 3)}")

    exit_wait = asyncio.ensure_future(vm.exited.wait())
    done_wait = asyncio.ensure_future(wait())
    try:
        done, _ = await asyncio.wait({exit_wait, done_wait}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        exit_wait.cancel()
        if not done_wait.done():
            done_wait.cancel()
    if done_wait in done:
        done_wait.result()  # re-raise a failure
        return
    if exit_wait in done:
        raise DriverError(f"qemu exited during snapshot transfer: {tail(vm.files.qemu_log)}")
    raise DriverError(f"snapshot transfer did not finish in {timeout:.0f} s")


def tail(path: Path, lines: int = 8) -> str:
    data = read_tail(path)  # the guest writes its console: bounded
    if data is None:
        return "(no log)"
    text = data.decode(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:]) or "(empty log)"
