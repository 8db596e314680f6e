"""The container image: built by scripts/build-image.sh from Debian packages only; `pgfleet
--version` runs from it, and `pgfleet up` (the image's own command) serves a database made with
the image's CLI to psql, then stops cleanly. The build takes minutes, so the image is cached
under $PGFLEET_CACHE keyed by its recipe (the build script, the package list, the version and
pinned dependencies)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from pgfleet.config import default_cache

from ..polling import wait_until

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("mmdebstrap", "umoci", "skopeo")
MISSING = [t for t in TOOLS if shutil.which(t) is None]

pytestmark = pytest.mark.skipif(
    bool(MISSING) or os.geteuid() != 0,
    reason=f"SKIPPED LOUDLY: building the image needs root and {', '.join(TOOLS)} "
           f"(missing: {', '.join(MISSING) or 'root'}; apt-get install mmdebstrap umoci skopeo)")


def _inputs_key() -> str:
    h = hashlib.sha256()
    # the recipe, not pgfleet's sources: a code change alone does not cost a ~5-15 minute rebuild
    # (the cached image may hold an older pgfleet of the same version; the pipeline is what is tested)
    for f in (REPO / "scripts/build-image.sh", REPO / "apt-packages.txt"):
        h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]  # not the test extras
    h.update(repr((project["version"], project["dependencies"])).encode())
    return h.hexdigest()[:16]


VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"


@pytest.fixture(scope="module")
def image() -> Path:
    """The built image's output directory (OCI layout in oci/, docker-archive beside it)."""
    out = default_cache() / f"image-{_inputs_key()}"
    if not (out / f"pgfleet-{VERSION}.tar").exists():
        proc = subprocess.run([str(REPO / "scripts/build-image.sh"), str(out)], capture_output=True, text=True,
                              timeout=1800, env=dict(os.environ, PYTHON=str(REPO / ".venv/bin/python")))
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _unpack(image: Path, tmp_path: Path) -> tuple[Path, dict]:
    """The OCI image's own root, unpacked as a runtime would, and its runtime config."""
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{image}/oci:{VERSION}", str(bundle)], check=True,
                   capture_output=True, timeout=300)
    return bundle / "rootfs", json.loads((bundle / "config.json").read_text())


def test_image_builds_from_debian_packages_and_runs_pgfleet(image, tmp_path):
    root, config = _unpack(image, tmp_path)
    ran = subprocess.run([CHROOT, str(root), "pgfleet", "--version"], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/opt/pgfleet/bin:/usr/bin:/bin"})
    assert ran.returncode == 0 and ran.stdout.strip() == f"pgfleet {VERSION}", ran.stderr
    assert list(root.glob("usr/lib/postgresql/*/bin/postgres")), "no Postgres server in the image"
    assert config["process"]["args"][:2] == ["pgfleet", "up"]
    # nothing of the test tool chain came in
    for absent in ("usr/bin/qemu-system-x86_64", "usr/sbin/pgbouncer", "usr/bin/node"):
        assert not (root / absent).exists(), absent


# Runs the image's command in its unpacked root, as a privileged container with the host's
# network would (deploy/node.yaml): a mount namespace of its own whose root is a mount (as a
# runtime's is: the sandbox's `unshare --mount` changes its propagation), with /proc, /sys
# (cgroups) and /dev from the host and a fresh /run and /tmp. The host's uid registry is bound
# in, so the image's databases never take a uid a database of another daemon here holds.
_CONTAINER = """set -e
root="$1"; shift
mount --bind "$root" "$root"
for d in proc sys dev; do mount --rbind "/$d" "$root/$d"; done
mount -t tmpfs -o mode=0755 run "$root/run"
mount -t tmpfs -o mode=1777 tmp "$root/tmp"
mkdir -p -m 0700 /var/lib/pgfleet-uids "$root/var/lib/pgfleet-uids"
mount --bind /var/lib/pgfleet-uids "$root/var/lib/pgfleet-uids"
exec chroot "$root" "$@"
"""


def _command_on_loopback(args: list[str]) -> list[str]:
    """The image's command with its listeners on free loopback ports (a test host's 6432 may be
    taken) and the HTTP listener too."""
    out = list(args)
    for i, arg in enumerate(out[:-1]):
        if arg in ("--listen", "--listen-pooled", "--api"):
            out[i + 1] = "127.0.0.1:0"
    return [*out, "--listen-http", "127.0.0.1:0"]


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (its Postgres servers, whatever namespaces they are in)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # gone meanwhile
        parents[int(stat.parent.name)] = int(text[text.rindex(")") + 2:].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def test_pgfleet_up_from_the_image_serves_a_database_and_stops_cleanly(image, tmp_path):
    root, config = _unpack(image, tmp_path)
    env = dict(e.split("=", 1) for e in config["process"]["env"])
    home = root / env["PGFLEET_HOME"].lstrip("/")
    daemon = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _CONTAINER, "container", str(root),
         "env", "-i", *config["process"]["env"], *_command_on_loopback(config["process"]["args"])],
        stdout=(tmp_path / "daemon.out").open("w"), stderr=subprocess.STDOUT)

    def in_image(*args: str) -> subprocess.CompletedProcess:
        """The image's own CLI, in the daemon's mount namespace and root."""
        return subprocess.run(["nsenter", f"--mount=/proc/{daemon.pid}/ns/mnt", CHROOT, str(root),
                               "env", "-i", *config["process"]["env"], "pgfleet", *args],
                              capture_output=True, text=True, timeout=180)

    try:
        wait_until(lambda: (home / "daemon.json").exists() or daemon.poll() is not None, timeout=180,
                   what="the daemon in the image to serve")
        assert daemon.poll() is None, (tmp_path / "daemon.out").read_text()[-3000:]
        made = in_image("db", "create", "shop", "--json")
        assert made.returncode == 0, made.stderr
        created = json.loads(made.stdout)
        for uri in (created["uri"], created["pooled_uri"]):
            psql = subprocess.run(["psql", uri, "-XAtc", "SELECT current_database(), current_user"],
                                  capture_output=True, text=True, timeout=120)
            assert (psql.returncode, psql.stdout.strip()) == (0, "shop|shop"), psql.stderr
        servers = _descendants(daemon.pid)
        assert servers, "no Postgres server under the daemon"
        down = in_image("down")
        assert down.returncode == 0, down.stderr
        assert daemon.wait(timeout=120) == 0, (tmp_path / "daemon.out").read_text()[-3000:]
        assert not [pid for pid in servers if Path(f"/proc/{pid}").exists()], "processes left after down"
    finally:
        left = _descendants(daemon.pid)
        if daemon.poll() is None:
            daemon.terminate()
            daemon.wait(timeout=120)
        for pid in left:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
