"""Build the guest root filesystem and the template data disk.

Root filesystem: read-only EROFS (lz4hc; ext4 if mkfs.erofs is missing) holding exactly the
postgres binary, the `ldd` closure of it and of its loadable modules, its share files, the
time zone database, the C.UTF-8 locale, a few /etc files and the static init (guest/init.c).
Nothing else: no shell, no package manager, no tools.

Data disk: an ext4 image with a data directory made by the host's initdb (native speed;
the guest never runs initdb) plus guest/postgresql.conf and guest/pg_hba.conf.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import tempfile
from pathlib import Path

from pgfleet.drivers.base import DriverError

from .common import GUEST_DIR, Progress, no_progress, run

PG_MAJOR = "15"
PG_BIN = Path(f"/usr/lib/postgresql/{PG_MAJOR}/bin")
PG_LIB = Path(f"/usr/lib/postgresql/{PG_MAJOR}/lib")
PG_SHARE = Path(f"/usr/share/postgresql/{PG_MAJOR}")
# JIT pulls in libLLVM (~100 MB) and is off in the guest config; sepgsql needs SELinux.
SKIP_MODULES = re.compile(r"^(llvmjit.*|sepgsql\.so)$")
GUEST_UID, GUEST_GID = 101, 104  # the guest's postgres user; init reads it from the data dir


def postgres_version() -> str:
    """Exact installed server version, e.g. 'postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)'."""
    exe = PG_BIN / "postgres"
    if not exe.exists():
        raise DriverError(f"{exe} not found: install postgresql-{PG_MAJOR}")
    return run([str(exe), "--version"], "postgres --version").stdout.strip()


def compile_init(out: Path) -> Path:
    """Static, stripped init; static so the root filesystem needs no loader for PID 1."""
    src = GUEST_DIR / "init.c"
    run(
        ["gcc", "-static", "-Os", "-s", "-Wall", "-Werror", "-o", str(out), str(src)],
        "compiling the guest init (needs gcc and libc6-dev)",
    )
    return out


def ldd_closure(binaries: list[Path]) -> set[Path]:
    """Every shared object the binaries load, as ldd resolves them on this host."""
    libs: set[Path] = set()
    for binary in binaries:
        out = run(["ldd", str(binary)], f"ldd {binary}").stdout
        for line in out.splitlines():
            if "not found" in line:
                raise DriverError(f"{binary}: missing library: {line.strip()}")
            if m := re.search(r"(/\S+)\s+\(0x", line):
                libs.add(Path(m.group(1)))
    return libs


def _copy(src: Path, root: Path, dest: Path | None = None) -> None:
    """Copy src (following symlinks) to root/dest, also recreating the symlink chain."""
    dest = dest or src
    target = root / dest.relative_to("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    real = Path(os.path.realpath(src))
    if real != src and dest == src:
        # keep the name the loader asks for as a symlink to the real file (e.g. libc.so.6)
        _copy(real, root)
        if not target.exists() and not target.is_symlink():
            # relative to the directory the link really lands in (lib64 -> usr/lib64 etc.)
            here = os.path.realpath(target.parent)
            target.symlink_to(os.path.relpath(root / real.relative_to("/"), here))
        return
    if not target.exists():
        shutil.copy2(real, target)


def populate(root: Path, init: Path) -> dict[str, int]:
    """Lay out the guest tree under root; returns counts for the build log."""
    # usrmerge layout as on the host, so ELF interpreter and library paths resolve unchanged.
    for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for link, to in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        (root / link).symlink_to(to)
    for d in ("proc", "dev", "sys", "tmp", "run", "data", "etc"):
        (root / d).mkdir(exist_ok=True)
    shutil.copy2(init, root / "usr/sbin/init")

    postgres = PG_BIN / "postgres"
    modules = sorted(
        p for p in PG_LIB.glob("*.so") if not SKIP_MODULES.match(p.name)
    )
    libs = ldd_closure([postgres, *modules])
    for lib in sorted(libs):
        _copy(lib, root)
    _copy(postgres, root)
    for mod in modules:
        _copy(mod, root)
    shutil.copytree(PG_SHARE, root / PG_SHARE.relative_to("/"), symlinks=False,
                    ignore=shutil.ignore_patterns("man", "*.sample") )
    # Debian's postgres uses the system tz database; "right/" duplicates it with leap seconds.
    shutil.copytree("/usr/share/zoneinfo", root / "usr/share/zoneinfo", symlinks=True,
                    ignore=lambda d, names: ["right"] if d == "/usr/share/zoneinfo" else [])
    if Path("/usr/lib/locale/C.utf8").is_dir():
        shutil.copytree("/usr/lib/locale/C.utf8", root / "usr/lib/locale/C.utf8")

    etc = root / "etc"
    etc.joinpath("passwd").write_text(
        f"root:x:0:0:root:/:/nonexistent\npostgres:x:{GUEST_UID}:{GUEST_GID}:PostgreSQL:/tmp:/nonexistent\n"
    )
    etc.joinpath("group").write_text(f"root:x:0:\npostgres:x:{GUEST_GID}:\n")
    etc.joinpath("hosts").write_text("127.0.0.1 localhost\n10.0.0.1 host\n10.0.0.2 pgfleet\n")
    etc.joinpath("nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files\n")
    etc.joinpath("ld.so.conf").write_text("/usr/lib/x86_64-linux-gnu\n/usr/lib64\n/usr/lib\n")
    # A loader cache: each library lookup is one read, not a walk of the search path.
    run(["ldconfig", "-r", str(root)], "ldconfig for the guest root")
    return {"libraries": len(libs), "modules": len(modules)}


def make_image(root: Path, out: Path) -> str:
    """Pack the tree read-only; returns the filesystem type (the kernel cmdline needs it)."""
    if shutil.which("mkfs.erofs"):
        run(
            # Fixed timestamps and UUID: the same inputs give the same bytes.
            ["mkfs.erofs", "-zlz4hc,9", "--all-root", "-T0", "-U", "00000000-0000-4000-8000-00000000f1ee",
             "--quiet", str(out), str(root)],
            "mkfs.erofs",
        )
        return "erofs"
    size_mb = int(_du(root) / 2**20 * 1.2) + 16
    run(
        ["mkfs.ext4", "-q", "-F", "-d", str(root), "-L", "pgroot", "-m", "0", "-O", "^has_journal",
         "-E", "root_owner=0:0", str(out), f"{size_mb}M"],
        "mkfs.ext4 (rootfs)",
    )
    return "ext4"


def _du(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*"))


def build_rootfs(out: Path, progress: Progress = no_progress) -> str:
    """Build the read-only root image at `out`; returns its filesystem type."""
    with tempfile.TemporaryDirectory(prefix="pgfleet-rootfs-", dir=out.parent) as tmp:
        progress("rootfs", 0.0, "compiling the guest init")
        init = compile_init(Path(tmp) / "init")
        root = Path(tmp) / "root"
        root.mkdir()
        progress("rootfs", 0.2, "collecting postgres, its ldd closure and share files")
        counts = populate(root, init)
        progress("rootfs", 0.6, f"packing {counts['libraries']} libraries, {counts['modules']} modules")
        return make_image(root, out)


def build_data_disk(out: Path, size_mb: int, progress: Progress = no_progress) -> None:
    """An ext4 image whose /pgdata is a fresh cluster owned by the guest postgres uid."""
    initdb = PG_BIN / "initdb"
    try:
        owner = pwd.getpwnam("postgres")
    except KeyError as exc:
        raise DriverError("no host user `postgres` to run initdb as") from exc
    # Not under out.parent: that is a private (0700) build directory initdb could not enter.
    with tempfile.TemporaryDirectory(prefix="pgfleet-data-") as tmp:
        top = Path(tmp) / "top"
        pgdata = top / "pgdata"
        top.mkdir()
        os.chown(top, owner.pw_uid, owner.pw_gid)
        os.chmod(tmp, 0o755)
        progress("data", 0.0, "initdb")
        # The superuser is `postgres`; only the host and guest root reach it (guest/pg_hba.conf).
        run(
            ["runuser", "-u", "postgres", "--", str(initdb), "-D", str(pgdata), "-U", "postgres",
             "-E", "UTF8", "--locale=C.UTF-8", "--auth=trust", "-N"],
            "initdb",
        )
        with (pgdata / "postgresql.conf").open("a") as f:
            f.write("\n# --- pgfleet microvm ---\n" + (GUEST_DIR / "postgresql.conf").read_text())
        for auth in ("pg_hba.conf", "pg_ident.conf"):  # no trust for what runs in the guest
            shutil.copyfile(GUEST_DIR / auth, pgdata / auth)
        # The guest's postgres uid/gid are fixed; re-own everything to them.
        for p in [top, *top.rglob("*")]:
            os.lchown(p, GUEST_UID, GUEST_GID)
        progress("data", 0.5, "mkfs.ext4 data disk")
        # lazy_*_init keeps the image sparse (init mounts with noinit_itable); a small journal
        # keeps the filesystem consistent across a VMM kill.
        run(
            ["mkfs.ext4", "-q", "-F", "-d", str(top), "-L", "pgdata", "-m", "0", "-b", "4096",
             "-J", "size=16", "-E", "lazy_itable_init=1,lazy_journal_init=1",
             str(out), f"{size_mb}M"],
            "mkfs.ext4 (data disk)",
        )
