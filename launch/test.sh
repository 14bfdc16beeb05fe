#!/usr/bin/env bash
# The test command: set up the environment (test extras), then run the whole suite in
# parallel with pytest-xdist.  Extra arguments go to pytest, e.g.
#   bash launch/test.sh -k harness
#   bash launch/test.sh tests/test_harness.py -n 0
# A path argument replaces the default `tests` directory.  pytest's exit code is returned;
# "no tests collected" (exit 5) is reported and counts as a failure.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

PY="$(bash "$REPO/launch/setup.sh" test,reference | tail -n 1)"

# Run the default `tests` directory unless a test path was given.
targets=(tests)
for arg in "$@"; do
    if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
        targets=()
        break
    fi
done

# --durations: the slowest tests are listed at the end of every run (CI logs included).
echo "[test] $PY -m pytest -n auto --durations=15 ${targets[*]} $*" >&2
start=$SECONDS
set +e
"$PY" -m pytest -n auto --durations=15 "${targets[@]}" "$@"
rc=$?
set -e
echo "[test] pytest exit code $rc after $((SECONDS - start))s" >&2
if [[ $rc -eq 5 ]]; then
    echo "[test] error: no tests ran (pytest exit 5); counted as a failure" >&2
fi
exit "$rc"
