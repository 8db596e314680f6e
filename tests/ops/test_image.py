"""The container image: built by scripts/build-image.sh from Debian packages only, and
`pgfleet --version` runs from it. The build takes minutes, so the image is cached under
$PGFLEET_CACHE keyed by its recipe (the build script, the package list, the version and pinned dependencies)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from pgfleet.config import default_cache

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


def test_image_builds_from_debian_packages_and_runs_pgfleet(tmp_path):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    out = default_cache() / f"image-{_inputs_key()}"
    if not (out / f"pgfleet-{version}.tar").exists():
        proc = subprocess.run([str(REPO / "scripts/build-image.sh"), str(out)], capture_output=True, text=True,
                              timeout=1800, env=dict(os.environ, PYTHON=str(REPO / ".venv/bin/python")))
        assert proc.returncode == 0, proc.stderr[-3000:]
    # the OCI image's own root, unpacked as a runtime would, runs pgfleet and has Postgres
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{out}/oci:{version}", str(bundle)], check=True,
                   capture_output=True, timeout=300)
    root = bundle / "rootfs"
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    ran = subprocess.run([chroot, str(root), "pgfleet", "--version"], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/opt/pgfleet/bin:/usr/bin:/bin"})
    assert ran.returncode == 0 and ran.stdout.strip() == f"pgfleet {version}", ran.stderr
    assert list(root.glob("usr/lib/postgresql/*/bin/postgres")), "no Postgres server in the image"
    import json

    config = json.loads((bundle / "config.json").read_text())
    assert config["process"]["args"][:2] == ["pgfleet", "up"]
    # nothing of the test tool chain came in
    for absent in ("usr/bin/qemu-system-x86_64", "usr/sbin/pgbouncer", "usr/bin/node"):
        assert not (root / absent).exists(), absent
