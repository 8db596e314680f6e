#!/usr/bin/env bash
# The suite: the fast layer (tests/unit: no root, no Postgres) first, then the rest, with
# the skip count and reasons printed loudly at the end. `--fast` runs the fast layer alone.
set -uo pipefail
cd "$(dirname "$0")/.."
fast_only=0
if [[ "${1:-}" == "--fast" ]]; then
    fast_only=1
    shift
fi
for arg in "$@"; do  # test paths given: run just those, once
    [[ "$arg" == -* ]] || { layers=given; break; }
done
log=$(mktemp)
if [[ "${layers:-}" == given ]]; then
    .venv/bin/python -m pytest -rs -q "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    fast_only=1
else
    .venv/bin/python -m pytest -rs -q tests/unit "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
fi
if [[ $fast_only == 0 && $rc == 0 ]]; then
    .venv/bin/python -m pytest -rs -q --ignore=tests/unit "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
fi
skips=$(grep -c '^SKIPPED' "$log" || true)
echo "=== pgfleet test summary: exit $rc, $skips skipped test group(s) (reasons above, lines starting SKIPPED) ==="
rm -f "$log"
# pytest exits 5 when it collected nothing: that is a failure of the suite, not a pass
exit $rc
