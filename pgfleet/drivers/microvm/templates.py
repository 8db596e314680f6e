"""Templates: one booted, warmed and snapshotted guest per machine shape (image, QEMU,
accelerator, memory, vCPUs), in the cache; every database is a copy of one."""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from pgfleet.drivers.base import Backend, DriverError
from pgfleet.drivers.roles import personalise_sql

from . import network, vmm
from .clonepool import Template
from .common import GUEST_ADDR, PG_PORT, QEMU, content_hash
from .guest import GuestCommand, GuestControl, admin, sql_command, wait_ready
from .image import Image, live_users
from .snapshot import copy_sparse, sync_snapshot, unlink_quiet

log = logging.getLogger("pgfleet.drivers.microvm")

TEMPLATE_FORMAT = "pgfleet-microvm-template-v2"


def flock(path: Path):
    f = open(path, "w")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f  # closing it releases the lock


class TemplateMaker:
    """Finding or making the template of a machine shape (a mixin of MicroVMDriver)."""

    image: Image | None
    accel: str | None
    cache: Path
    boot_timeout: float
    guest: GuestControl
    _templates: dict[tuple[int, int], Template]
    _template_lock: asyncio.Lock

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
                lock = await asyncio.to_thread(flock, self.cache / "templates" / ".lock")
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
            await wait_ready(vm, backend, self.boot_timeout)
            # Warm the guest page cache with what personalising and first queries touch,
            # and write a checkpoint so a clone's crash recovery has little to replay.
            conn = await admin(backend)
            try:
                await conn.query("SELECT count(*) FROM pg_class; SELECT count(*) FROM pg_roles; "
                                 "CHECKPOINT")
            finally:
                await conn.close()
            # The admin session held by init is part of the snapshot: clones are personalised
            # through it with no TCP handshake and no backend fork. Warm its caches with the
            # very statements personalising runs, rolled back.
            await self.guest.control(ns, [GuestCommand.ADMIN_OPEN, sql_command(
                "BEGIN; " + personalise_sql("pgfleet_warmup", "pgfleet_warmup") + "; ROLLBACK")])
            token = await self._save(vm, files)
            # Templates outlive host reboots: make them durable before anyone copies them.
            await asyncio.to_thread(sync_snapshot, files.state, [files.ram, files.data], token)
            meta = {"memory_mb": memory_mb, "vcpus": vcpus, "image": self.image.key,
                    "accel": self.accel, "made_in_s": round(time.perf_counter() - t0, 2),
                    "created_at": time.time()}
            (tmp / "template.json").write_text(json.dumps(meta, indent=2))
            for junk in (files.qmp, files.pid, files.qemu_log):
                unlink_quiet(junk)
            if live_users(final):  # a broken template whose image databases still read through to
                raise DriverError(f"template {final} lacks template.json but databases use its "
                                  "data image: move it aside by hand")
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
