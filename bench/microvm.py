"""Benchmark of the microvm driver: boot, clone, suspend, wake, warm standby, memory, disk.

    .venv/bin/python bench/microvm.py [--cycles 60] [--clones 20] [--vms 8] [--tb-sweep 16,32]

Writes bench/results/microvm.json and bench/results/microvm.png. Every latency is measured
from the host's point of view with a real Postgres round trip at the end; mechanism costs
(QEMU start, device-state load, file copies, ...) come from the driver's own timings and are
reported separately. The accelerator (KVM or TCG) is part of the output: under TCG the
guest's CPU runs at ~1% of native speed, so guest-side work dominates what KVM hosts see.

Warm standby (issue #11): freeze (QMP stop, its cgroup squeezed where the host has swap) and
the wake from it: thaw (limit back, QMP cont) to the first `SELECT 1` on a held connection, or
on a new one; the same query on the held session of the running VM as the floor; plus the memory
still charged to the paused VM's cgroup.

Memory: PSS of each running VM's QEMU process, split into guest RAM (its RAM file mapping),
the TCG translation cache (absent under KVM) and QEMU's own memory; measured right after a
query and again once the VMs idled `--settle` seconds (free page reporting hands memory the
guest freed back ~2 s after it was freed). `--tb-sweep` measures wake latency and TCG cache
size for other PGFLEET_TCG_TB_MB values (each needs its own template).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgfleet.drivers.base import Backend, InstanceSpec  # noqa: E402
from pgfleet.drivers.microvm import MicroVMDriver  # noqa: E402
from pgfleet.drivers.microvm.snapshot import allocated_bytes  # noqa: E402
from pgfleet.drivers.microvm.vmm import VmFiles  # noqa: E402
from pgfleet.pgwire.client import AdminConnection  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {  # from the issue; ms unless noted
    "wake_held_first_query_ms": 150, "clone_first_query_ms": 300, "suspend_ms": 20,
    "running_pss_mib": 50, "rootfs_mb": 60, "kernel_mb": 4,
    "warm_held_first_query_ms": 30,  # issue #11: microVM (TCG) warm wake, held session, p50
}


def pct(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    if not v:
        return {}

    def q(p: float) -> float:
        return v[min(len(v) - 1, max(0, round(p / 100 * (len(v) - 1))))]

    return {"n": len(v), "p50": q(50), "p90": q(90), "p99": q(99), "min": v[0], "max": v[-1],
            "mean": statistics.fmean(v)}


async def connect(backend: Backend, user: str = "postgres") -> AdminConnection:
    reader, writer = await backend.open_connection()
    return await AdminConnection.open(reader, writer, user, backend.database)


async def first_query(backend: Backend) -> None:
    conn = await connect(backend)
    try:
        await conn.query("SELECT 1")
    finally:
        await conn.close()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="pgfleet-bench-microvm-", dir="/var/tmp"))
        self.driver = MicroVMDriver(self.root / "state")
        self.slot = 6000
        self.samples: dict[str, list[float]] = {}
        self.mech: dict[str, list[float]] = {}
        self.specs: list[InstanceSpec] = []
        self.pool_hits = 0

    def spec(self) -> InstanceSpec:
        self.slot += 1
        s = InstanceSpec(uuid=str(uuid.uuid4()), name=f"b{self.slot}", role="app", memory_mb=128,
                         slot=self.slot, home=self.root / f"i{self.slot}")
        self.specs.append(s)
        return s

    def add(self, key: str, ms: float) -> None:
        self.samples.setdefault(key, []).append(ms)

    def add_mech(self, prefix: str) -> None:
        for k, v in self.driver.last_timings.items():
            if k.endswith("_ms"):
                self.mech.setdefault(f"{prefix}.{k}", []).append(v)

    async def run(self) -> dict:
        self.load_start = os.getloadavg()
        t0 = time.perf_counter()
        await self.driver.prepare()
        prepare_s = time.perf_counter() - t0
        image = self.driver.image
        assert image is not None
        print(f"accel={self.driver.accel} prepare={prepare_s:.2f}s", flush=True)

        # Clone: template copy + restore + reseed + personalise, then a new connection's SELECT 1.
        for _ in range(self.args.clones):
            s = self.spec()
            t = time.perf_counter()
            backend = await self.driver.create(s)
            t_created = time.perf_counter()
            self.add_mech("create")
            await first_query(backend)
            self.add("clone_first_query_ms", (time.perf_counter() - t) * 1000)
            self.add("clone_create_ms", (t_created - t) * 1000)
            # what a fresh database owns of its data disk (a copy-on-write overlay)
            self.add("fresh_data_disk_mib", (await self.driver.disk_bytes(s) or 0) / 2**20)
            self.pool_hits += "pool_take_ms" in self.driver.last_timings
            await self.driver.destroy(s)
            # Clones arriving back to back would outrun the pool's background refill; this
            # measures the steady state where the pool keeps up (as it does at <10 creates/s).
            await asyncio.sleep(0.2)
        print("clones done", flush=True)

        # Cold boot: a stopped instance boots from its data disk (kernel, init, Postgres).
        s = self.spec()
        backend = await self.driver.create(s)
        for _ in range(self.args.boots):
            await self.driver.stop(s)
            t = time.perf_counter()
            await self.driver.start(s)
            await first_query(backend)
            self.add("cold_boot_first_query_ms", (time.perf_counter() - t) * 1000)
            self.add_mech("boot")
        await self.driver.destroy(s)
        print("cold boots done", flush=True)

        # Scale to zero: suspend, then wake to the first query on a held and on a new connection.
        s = self.spec()
        backend = await self.driver.create(s)
        held = await connect(backend)
        await held.query("CREATE TABLE IF NOT EXISTS c (n int)")
        for i in range(self.args.cycles):
            t = time.perf_counter()
            await self.driver.suspend(s)
            self.add("suspend_ms", (time.perf_counter() - t) * 1000)
            self.add_mech("suspend")
            t = time.perf_counter()
            await self.driver.start(s)
            self.add("wake_start_ms", (time.perf_counter() - t) * 1000)
            self.add_mech("wake")
            if i % 2 == 0:
                await held.query(f"INSERT INTO c VALUES ({i})")
                self.add("wake_held_first_query_ms", (time.perf_counter() - t) * 1000)
            else:
                await first_query(backend)
                self.add("wake_new_conn_first_query_ms", (time.perf_counter() - t) * 1000)
        rows = await held.scalar("SELECT count(*) FROM c")
        await held.close()
        assert rows == str((self.args.cycles + 1) // 2), f"lost rows: {rows}"
        await self.driver.destroy(s)
        print("cycles done", flush=True)

        # Warm standby: freeze, then thaw to the first query on a held and on a new connection.
        s = self.spec()
        backend = await self.driver.create(s)
        held = await connect(backend)
        await held.query("CREATE TABLE IF NOT EXISTS c (n int)")
        warm_charged = []
        for i in range(self.args.warm_cycles):
            # the floor: the same query on the same held session, the VM running (under TCG
            # a guest round trip is most of any wake, and it swings with the host's load)
            t = time.perf_counter()
            await held.query("SELECT 1")
            self.add("running_held_query_ms", (time.perf_counter() - t) * 1000)
            await held.query(f"INSERT INTO c VALUES ({i})")  # committed before each freeze
            t = time.perf_counter()
            charged = await self.driver.freeze(s)
            self.add("warm_freeze_ms", (time.perf_counter() - t) * 1000)
            warm_charged.append(charged / 2**20)
            t = time.perf_counter()
            await self.driver.thaw(s)
            self.add("warm_thaw_ms", (time.perf_counter() - t) * 1000)
            if i % 2 == 0:
                await held.query("SELECT 1")
                self.add("warm_held_first_query_ms", (time.perf_counter() - t) * 1000)
            else:
                await first_query(backend)
                self.add("warm_new_conn_first_query_ms", (time.perf_counter() - t) * 1000)
        rows = await held.scalar("SELECT count(*) FROM c")
        await held.close()
        assert rows == str(self.args.warm_cycles), f"lost rows: {rows}"
        await self.driver.destroy(s)
        print("warm cycles done", flush=True)

        # Memory: several running clones after a query each; then disk per standby VM.
        running = []
        for _ in range(self.args.vms):
            s = self.spec()
            b = await self.driver.create(s)
            await first_query(b)
            running.append((s, b))
        memory = {"after_query": await self.memory(running)}
        await asyncio.sleep(self.args.settle)  # a measuring point, not synchronisation
        memory["settled"] = await self.memory(running)
        for s, b in running:
            await self.driver.suspend(s)
        standby_disk = [sum(allocated_bytes(p) for p in (VmFiles(s.home).ram, VmFiles(s.home).disk,
                                                          VmFiles(s.home).state)) / 2**20
                        for s, _ in running]
        # ... and they all come back.
        for s, b in running:
            await self.driver.start(s)
            await first_query(b)
            await self.driver.destroy(s)

        summary = {k: pct(v) for k, v in self.samples.items()}
        summary["running_pss_mib"] = memory["settled"]["pss"]
        summary["running_rss_mib"] = memory["settled"]["rss"]
        summary["running_pss_without_tcg_mib"] = memory["settled"]["without_tcg"]
        summary["standby_disk_mib"] = pct(standby_disk)
        summary["warm_charged_mib"] = pct(warm_charged)
        template_ram = allocated_bytes(self.driver._templates[(128, 1)].files.ram) / 2**20
        result = {
            "driver": "microvm",
            "accel": self.driver.accel,
            "accel_note": ("TCG: the guest CPU is emulated (~1% of native); guest-side work is "
                           "~100x slower than on a KVM host, mechanism costs are comparable")
            if self.driver.accel == "tcg" else "KVM",
            "host": {"cpus": os.cpu_count(), "kernel": platform.release(),
                     "python": platform.python_version(),
                     # the machine is shared: other work inflates every latency here
                     "loadavg_at_start": self.load_start, "loadavg_at_end": os.getloadavg()},
            "guest_memory_mb": 128,
            "image": {"name": image.name, "key": image.key, "kernel_bytes": image.kernel_bytes,
                      "rootfs_bytes": image.rootfs_bytes, "rootfs_type": image.rootfs_type,
                      "postgres": image.postgres_version},
            "prepare_s": round(prepare_s, 3),
            "warm_mode": self.driver.warm_mode(),
            "clone_pool_hits": f"{self.pool_hits}/{self.args.clones} clones took a pre-copied "
                               "template copy (mechanism: pool_take vs copy)",
            "tcg_tb_mb": int(os.environ.get("PGFLEET_TCG_TB_MB", "32")),
            "template_ram_file_mib": round(template_ram, 1),
            "memory": {
                "vms": self.args.vms, "settle_s": self.args.settle,
                "note": ("PSS per running VM (MiB) split into guest_ram (pages of its RAM file "
                         "mapped), tcg_code_cache (TCG translation buffer; none under KVM) and "
                         "qemu_own (heap, stacks, binary and libraries, shared pages divided "
                         "among the VMs); without_tcg = guest_ram + qemu_own"),
                **memory,
            },
            "results": summary,
            "mechanism_ms": {k: pct(v) for k, v in sorted(self.mech.items())},
            "targets": TARGETS,
            "verdict": self.verdict(summary, image),
            "raw": self.samples,
        }
        return result

    async def memory(self, running: list) -> dict[str, dict[str, float]]:
        use = [await self.driver.usage(s) for s, _ in running]

        def mib(key: str) -> dict[str, float]:
            return pct([u[key] / 2**20 for u in use])
        return {"pss": mib("pss_bytes"), "rss": mib("rss_bytes"),
                "guest_ram": mib("pss_guest_ram_bytes"), "tcg_code_cache": mib("pss_tcg_bytes"),
                "qemu_own": mib("pss_qemu_bytes"),
                "without_tcg": pct([(u["pss_bytes"] - u["pss_tcg_bytes"]) / 2**20 for u in use])}

    async def tb_sweep(self, sizes: list[int]) -> list[dict]:
        """Clone and wake latency and TCG cache PSS for other translation cache sizes: per
        size one template, --sweep-cycles clones to a first query (no clone pool: each
        includes its copy) and --sweep-cycles held-connection wakes of one VM."""
        out = []
        default = os.environ.get("PGFLEET_TCG_TB_MB")
        for mb in sizes:
            os.environ["PGFLEET_TCG_TB_MB"] = str(mb)
            driver = MicroVMDriver(self.root / f"sweep-{mb}", clone_pool=0)
            s = self.spec()
            try:
                await driver.prepare()
                clones = []
                for _ in range(self.args.sweep_cycles):
                    c = self.spec()
                    t = time.perf_counter()
                    await first_query(await driver.create(c))
                    clones.append((time.perf_counter() - t) * 1000)
                    after_clone = await driver.usage(c)
                    await driver.destroy(c)
                backend = await driver.create(s)
                held = await connect(backend)
                await held.query("SELECT 1")
                wakes = []
                for _ in range(self.args.sweep_cycles):
                    await driver.suspend(s)
                    t = time.perf_counter()
                    await driver.start(s)
                    await held.query("SELECT 1")
                    wakes.append((time.perf_counter() - t) * 1000)
                use = await driver.usage(s)
                await held.close()
                out.append({"tb_mb": mb, "clone_first_query_ms": pct(clones),
                            "wake_held_first_query_ms": pct(wakes),
                            "tcg_code_cache_mib_after_clone_query": after_clone["pss_tcg_bytes"] / 2**20,
                            "tcg_code_cache_mib_after_wakes": use["pss_tcg_bytes"] / 2**20})
                print(f"tb-size {mb} MiB: clone p50 {out[-1]['clone_first_query_ms']['p50']:.0f} ms "
                      f"(TCG cache {out[-1]['tcg_code_cache_mib_after_clone_query']:.1f} MiB), "
                      f"wake p50 {out[-1]['wake_held_first_query_ms']['p50']:.0f} ms "
                      f"(TCG cache {out[-1]['tcg_code_cache_mib_after_wakes']:.1f} MiB)", flush=True)
            finally:
                await driver.destroy(s)
                tpl = driver._templates.get((128, 1))
                await driver.close()
                if tpl is not None and str(mb) != (default or "32"):
                    shutil.rmtree(tpl.dir, ignore_errors=True)  # only this sweep needed it
        if default is None:
            os.environ.pop("PGFLEET_TCG_TB_MB", None)
        else:
            os.environ["PGFLEET_TCG_TB_MB"] = default
        return out

    @staticmethod
    def verdict(summary: dict, image) -> dict[str, str]:
        def check(value: float, target: float) -> str:
            return f"{value:.1f} vs <= {target}: {'met' if value <= target else 'MISSED'}"
        return {
            "wake_held_first_query_ms p50": check(summary["wake_held_first_query_ms"]["p50"],
                                                  TARGETS["wake_held_first_query_ms"]),
            "warm_held_first_query_ms p50": check(summary["warm_held_first_query_ms"]["p50"],
                                                  TARGETS["warm_held_first_query_ms"]),
            "clone_first_query_ms p50": check(summary["clone_first_query_ms"]["p50"],
                                              TARGETS["clone_first_query_ms"]),
            "suspend_ms p50": check(summary["suspend_ms"]["p50"], TARGETS["suspend_ms"]),
            "running_pss_mib p50 (settled)": check(summary["running_pss_mib"]["p50"],
                                                   TARGETS["running_pss_mib"]),
            # Not the target, a pointer: what is left without the TCG translation cache.
            "running_pss_mib p50 without the TCG cache (settled)": check(
                summary["running_pss_without_tcg_mib"]["p50"], TARGETS["running_pss_mib"]),
            "rootfs_mb": check(image.rootfs_bytes / 1e6, TARGETS["rootfs_mb"]),
            "kernel_mb": check(image.kernel_bytes / 2**20, TARGETS["kernel_mb"]),
        }

    async def cleanup(self) -> None:
        for s in self.specs:
            try:
                await self.driver.destroy(s)
            except Exception as exc:  # keep cleaning the others
                print(f"cleanup {s.name}: {exc}", file=sys.stderr)
        await self.driver.close()
        shutil.rmtree(self.root, ignore_errors=True)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = result["raw"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 5),
                                        gridspec_kw={"width_ratios": [4, 4, 2]})
    for key in ("suspend_ms", "wake_held_first_query_ms", "wake_new_conn_first_query_ms",
                "clone_first_query_ms", "warm_freeze_ms", "warm_held_first_query_ms",
                "warm_new_conn_first_query_ms"):
        v = sorted(raw.get(key, []))
        if v:
            ax1.plot(v, [(i + 1) / len(v) for i in range(len(v))], label=key.replace("_ms", ""))
    ax1.set_xscale("log")
    ax1.set_xlabel("ms (log)")
    ax1.set_ylabel("fraction of operations")
    ax1.set_title(f"microvm latencies, CDF ({result['accel'].upper()})")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    mech = result["mechanism_ms"]
    keys = [k for k in mech if k.split(".")[0] in ("create", "wake", "suspend") and
            not k.endswith("total_ms")]
    ax2.barh([k.replace("_ms", "") for k in keys], [mech[k]["p50"] for k in keys], color="tab:blue")
    ax2.set_xlabel("p50 ms")
    ax2.set_title("mechanism costs (p50)")
    ax2.grid(True, axis="x", alpha=0.3)
    mem = result.get("memory")
    if mem:
        phases = [p for p in ("after_query", "settled") if p in mem]
        bottom = [0.0] * len(phases)
        for part, color in (("guest_ram", "tab:blue"), ("qemu_own", "tab:gray"),
                            ("tcg_code_cache", "tab:orange")):
            vals = [mem[p][part]["p50"] for p in phases]
            ax3.bar(phases, vals, bottom=bottom, color=color, label=part)
            bottom = [b + v for b, v in zip(bottom, vals)]
        target = result["targets"]["running_pss_mib"]
        ax3.axhline(target, color="red", linestyle="--", label=f"target {target} MiB")
        ax3.set_ylabel("PSS per running VM, p50 (MiB)")
        ax3.set_title(f"memory ({mem['vms']} VMs, {result['guest_memory_mb']} MiB guests)")
        ax3.set_ylim(0, max(bottom + [target]) * 1.35)
        ax3.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=60, help="suspend/wake cycles (>= 50)")
    ap.add_argument("--clones", type=int, default=20)
    ap.add_argument("--warm-cycles", type=int, default=60, help="freeze/thaw cycles")
    ap.add_argument("--boots", type=int, default=5)
    ap.add_argument("--vms", type=int, default=8, help="clones running at once for the memory figure")
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds the running VMs idle before the settled memory figure")
    ap.add_argument("--tb-sweep", default="",
                    help="comma-separated PGFLEET_TCG_TB_MB values to compare (e.g. 16,32)")
    ap.add_argument("--sweep-cycles", type=int, default=12)
    ap.add_argument("--out", type=Path, default=RESULTS / "microvm.json")
    args = ap.parse_args()
    bench = Bench(args)
    try:
        result = await bench.run()
        if args.tb_sweep:
            result["tcg_tb_sweep"] = await bench.tb_sweep(
                [int(x) for x in args.tb_sweep.split(",") if x])
    finally:
        await bench.cleanup()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({"accel": result["accel"], "verdict": result["verdict"],
                      "memory_settled_p50_mib": {k: round(v["p50"], 1) for k, v in
                                                 result["memory"]["settled"].items()},
                      "results": {k: {kk: round(vv, 1) for kk, vv in v.items()}
                                  for k, v in result["results"].items()}}, indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    asyncio.run(main())
