#!/usr/bin/env bash
# Build the pgfleet container image from Debian packages only (no registry pulls):
#   1. wheels of pgfleet and its pinned dependencies (pyproject.toml, no test extras);
#   2. a Debian bookworm root with mmdebstrap: the daemon's packages (apt-packages.txt), a venv
#      in /opt/pgfleet with those wheels installed offline, and the sandbox's jail compiled
#      statically on the build host (the image has no C compiler; pgfleet looks for it there);
#   3. an OCI image with umoci (config as deploy/image/Containerfile says), and a docker-archive
#      tarball with skopeo for `kind load image-archive` / `ctr images import`.
# Usage (root): scripts/build-image.sh [OUT_DIR]   (default build/image)
# Out: OUT_DIR/oci (OCI layout, tag pgfleet:VERSION), OUT_DIR/pgfleet-VERSION.tar (docker-archive),
#      OUT_DIR/rootfs.tar (the root, for `buildah bud -f deploy/image/Containerfile OUT_DIR`).
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-build/image}")"
for tool in mmdebstrap umoci skopeo cc; do
    command -v "$tool" >/dev/null || { echo "build-image: needs $tool (apt-get install mmdebstrap umoci skopeo gcc)" >&2; exit 1; }
done
version="$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
suite="${PGFLEET_IMAGE_SUITE:-bookworm}"
mirror="${PGFLEET_IMAGE_MIRROR:-http://deb.debian.org/debian}"
rm -rf "$out"
mkdir -p "$out/wheels"

echo "build-image: wheels" >&2
python="${PYTHON:-.venv/bin/python}"
"$python" -m pip wheel --quiet --wheel-dir "$out/wheels" .

# the daemon's Debian packages: the first alternative of each line of apt-packages.txt
packages="$(sed -e 's/#.*//' -e 's/|.*//' apt-packages.txt | xargs | tr ' ' ,)"
echo "build-image: Debian $suite root with $packages" >&2
mmdebstrap --variant=minbase --mode=root --quiet \
    --include="$packages,ca-certificates" \
    --setup-hook='mkdir -p "$1/etc/postgresql-common/createcluster.d" && echo "create_main_cluster = false" > "$1/etc/postgresql-common/createcluster.d/pgfleet.conf"' \
    --customize-hook="copy-in $out/wheels /tmp" \
    --customize-hook='chroot "$1" python3 -m venv /opt/pgfleet' \
    --customize-hook='chroot "$1" /opt/pgfleet/bin/pip install --quiet --no-index --find-links /tmp/wheels pgfleet' \
    --customize-hook='jail="$(chroot "$1" /opt/pgfleet/bin/python -c "from pgfleet.drivers.jail import prebuilt_path; print(prebuilt_path())")" && cc -O2 -Wall -static -o "$1$jail" "$1${jail%/*}/jail.c"' \
    --customize-hook='zygote="$(chroot "$1" /opt/pgfleet/bin/python -c "from pgfleet.drivers.jail import prebuilt_zygote_path; print(prebuilt_zygote_path())")" && cc -O2 -Wall -shared -fPIC -o "$1$zygote" "$1${zygote%/*}/zygote.c"' \
    --customize-hook='rm -rf "$1/tmp/wheels" "$1/var/cache/apt/"*.bin "$1/var/lib/apt/lists/"*' \
    --customize-hook='mkdir -p "$1/var/lib/pgfleet" "$1/var/cache/pgfleet"' \
    "$suite" "$out/rootfs.tar" \
    "deb $mirror $suite main" "deb $mirror $suite-updates main" \
    "deb ${PGFLEET_IMAGE_SECURITY:-http://deb.debian.org/debian-security} $suite-security main"

echo "build-image: OCI image pgfleet:$version" >&2
oci="$out/oci"
umoci init --layout "$oci"
umoci new --image "$oci:$version"
bundle="$out/bundle"
umoci unpack --image "$oci:$version" "$bundle"
tar -xf "$out/rootfs.tar" -C "$bundle/rootfs"
umoci repack --image "$oci:$version" "$bundle"
rm -rf "$bundle"
umoci config --image "$oci:$version" \
    --config.env "PATH=/opt/pgfleet/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --config.env "PGFLEET_HOME=/var/lib/pgfleet" --config.env "PGFLEET_CACHE=/var/cache/pgfleet" \
    --config.entrypoint pgfleet \
    --config.cmd up --config.cmd --home --config.cmd /var/lib/pgfleet \
    --config.cmd --listen --config.cmd 0.0.0.0:6432 --config.cmd --listen-pooled --config.cmd 0.0.0.0:6433 \
    --config.cmd --api --config.cmd 0.0.0.0:8760 \
    --author "pgfleet" --clear=config.labels --config.label "org.opencontainers.image.version=$version"
umoci gc --layout "$oci"
skopeo copy --quiet "oci:$oci:$version" "docker-archive:$out/pgfleet-$version.tar:pgfleet:$version"
echo "build-image: $oci (pgfleet:$version), $out/pgfleet-$version.tar" >&2
