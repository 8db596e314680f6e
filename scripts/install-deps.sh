#!/usr/bin/env bash
# Install what pgfleet needs on a Debian/Ubuntu host, idempotently: the Debian packages that
# are missing, then the Python venv. `install-deps.sh run`: only what the daemon needs
# (apt-packages.txt, the package without test extras); `install-deps.sh` (or `test`): also the
# tests', benchmarks' and microVM tool chain (apt-packages-test.txt, .[test], node packages).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-test}"
lists=(apt-packages.txt)
[[ $mode == run ]] || lists+=(apt-packages-test.txt)

missing=()
while IFS= read -r line; do
    line="${line%%#*}"
    [[ -z "${line// }" ]] && continue
    IFS='|' read -ra alts <<< "$line"
    have=""
    for alt in "${alts[@]}"; do
        alt="$(echo "$alt" | xargs)"
        if dpkg-query -W -f='${Status}' "$alt" 2>/dev/null | grep -q "install ok installed"; then have=1; break; fi
    done
    [[ -n "$have" ]] && continue
    missing+=("$(echo "${alts[0]}" | xargs)")
    alternatives+=("$line")
done < <(cat "${lists[@]}")

if ((${#missing[@]})); then
    if [[ $EUID -ne 0 ]]; then
        echo "pgfleet needs these Debian packages; run as root or install them: ${missing[*]}" >&2
        exit 1
    fi
    echo "installing Debian packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    to_install=()
    for line in "${alternatives[@]}"; do
        IFS='|' read -ra alts <<< "$line"
        for alt in "${alts[@]}"; do
            alt="$(echo "$alt" | xargs)"
            if apt-cache show "$alt" >/dev/null 2>&1; then to_install+=("$alt"); break; fi
        done
    done
    apt-get install -y -qq --no-install-recommends "${to_install[@]}" >/dev/null
    # PgBouncer is only for bench/proxy.py, which runs its own: the Debian service would take
    # 127.0.0.1:6432, pgfleet's default listener
    if [[ " ${to_install[*]} " == *" pgbouncer "* ]] && command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now pgbouncer >/dev/null 2>&1 || true
    fi
fi

PY="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
if [[ $mode == run ]]; then
    stamp=.venv/.pgfleet-installed-run target='.' check="import pgfleet.cli.main"
    [[ -f .venv/.pgfleet-installed && ! pyproject.toml -nt .venv/.pgfleet-installed ]] && stamp=.venv/.pgfleet-installed
else
    stamp=.venv/.pgfleet-installed target='.[test]' check="import pgfleet.cli.main, psycopg, pytest"
fi
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    echo "installing Python packages into .venv" >&2
    .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
    if ! .venv/bin/pip install -q -e "$target" > .venv/pip.log 2>&1; then
        cat .venv/pip.log >&2
        exit 1
    fi
    .venv/bin/python -c "$check"
    touch "$stamp"
fi
[[ $mode == run ]] && exit 0

# node packages for the compatibility tests, each pinned by its package-lock.json: node-postgres
# (tests/compat/node) and Neon's serverless driver (tests/edge/node)
for node_dir in tests/compat/node tests/edge/node; do
if [[ -f $node_dir/package-lock.json ]]; then
    if ! command -v npm >/dev/null 2>&1 && [[ $EUID -eq 0 ]]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null || true
    fi
    node_stamp=$node_dir/node_modules/.pgfleet-installed
    if command -v npm >/dev/null 2>&1 && [[ ! -f $node_stamp || $node_dir/package-lock.json -nt $node_stamp ]]; then
        echo "installing node packages into $node_dir/node_modules" >&2
        (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
        touch "$node_stamp"
    fi
fi
done
