#!/usr/bin/env bash
# Run distopt's distributed test suite on every visible GPU with NCCL, or on CPU with gloo when
# there is none.  This is what the Docker image runs by default, and it goes through the very
# scripts CI runs (launch/test.sh -> launch/setup.sh), so the two cannot drift.
#
#   bash launch/test-distributed.sh                 # every test file that starts processes
#   bash launch/test-distributed.sh -k zero         # extra arguments go to pytest
#   bash launch/test-distributed.sh tests/test_zero.py
#
# Backend: tests/dist.py gives each multi-process test NCCL with one GPU per rank when at least
# world-size GPUs are visible (CUDA_VISIBLE_DEVICES limits them), else gloo on CPU; DeepSpeed
# and Accelerate launches use the GPUs when there are any.  With GPUs the tests run one at a
# time (each uses GPUs 0..world-1); on CPU they run in parallel (pytest-xdist), as in CI.
#
# Environment variables:
#   DISTOPT_TEST_WORKERS   pytest-xdist workers [GPUs: 0 (serial); CPU: auto]
#   DISTOPT_DRY_RUN=1      print the test command instead of running it
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

ngpu=0
if command -v nvidia-smi >/dev/null 2>&1; then
    ngpu="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
fi
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "$ngpu" -gt 0 ]]; then
    IFS=',' read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
    ngpu="${#visible[@]}"
fi

if [[ "$ngpu" -gt 0 ]]; then
    echo "[test-distributed] $ngpu GPU(s) visible: NCCL for tests with world size <= $ngpu" >&2
    workers="${DISTOPT_TEST_WORKERS:-0}"
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
else
    echo "[test-distributed] no GPU visible: gloo on CPU" >&2
    workers="${DISTOPT_TEST_WORKERS:-auto}"
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi

# Default targets: the test files that start several processes (harness, torchrun, launchers).
targets=()
for arg in "$@"; do
    if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
        targets=(none)
        break
    fi
done
if [[ ${#targets[@]} -eq 0 ]]; then
    mapfile -t targets < <(grep -l -E 'run_distributed\(|torch\.distributed\.run|accelerate_launch\(' tests/test_*.py | sort)
    [[ ${#targets[@]} -gt 0 ]] || { echo "[test-distributed] error: no distributed test files found" >&2; exit 1; }
else
    targets=()
fi

cmd=(bash "$REPO/launch/test.sh" "${targets[@]}" -n "$workers" "$@")
printf '[test-distributed]' >&2
printf ' %q' "${cmd[@]}" >&2
printf '\n' >&2
if [[ "${DISTOPT_DRY_RUN:-0}" == "1" ]]; then
    exit 0
fi
exec "${cmd[@]}"
