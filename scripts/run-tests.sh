#!/usr/bin/env bash
# The whole suite, with the skip count and reasons printed loudly at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
.venv/bin/python -m pytest -rs -q "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
skips=$(grep -c '^SKIPPED' "$log" || true)
echo "=== pgfleet test summary: exit $rc, $skips skipped test group(s) (reasons above, lines starting SKIPPED) ==="
rm -f "$log"
# pytest exits 5 when it collected nothing: that is a failure of the suite, not a pass
exit $rc
