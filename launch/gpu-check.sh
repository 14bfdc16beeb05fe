#!/usr/bin/env bash
# The GPU check: what distopt owes a CUDA machine, in at most 8 minutes on one GPU.
#
#   bash launch/gpu-check.sh                 # results under gpu-check-out/ (or $DISTOPT_GPU_CHECK_OUT)
#
# Stages (each under its own time limit; the limits add up to the 8-minute budget):
#   1. tests      tests/test_cuda.py: every case of the optimizer table on CUDA against the CPU
#                 results, state on the parameter's device (the fused Adam path's `step`
#                 included), bf16/fp16 parameters with persistent fp32 masters, GradScaler with
#                 every optimizer, and ZeRO-1/ZeRO-2/FSDP2 (bf16 masters too) at world size 1
#                 over NCCL; tests/test_bench_step.py's CUDA test.
#   2. bench      distopt bench step --device cuda: every optimizer against torch's fused AdamW
#                 on the same GPU (the table for docs/benchmarks.md: bench_step_cuda.md).
# Without a CUDA device it prints why and exits 0 (nothing to check here); a missing Python or
# torch is an error.  Exit status: 0 when every stage passed, else 1 (the summary names them).
#
# Environment variables:
#   DISTOPT_PYTHON            the interpreter [.venv/bin/python if present, else python3]
#   DISTOPT_GPU_CHECK_OUT     output folder [gpu-check-out]
#   DISTOPT_GPU_CHECK_TESTS_S / DISTOPT_GPU_CHECK_BENCH_S   stage limits in seconds [240 / 210]
#   DISTOPT_DRY_RUN=1         print the stage commands (after the CUDA check) instead of running them
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

if [[ -n "${DISTOPT_PYTHON:-}" ]]; then
    PY="$DISTOPT_PYTHON"
elif [[ -x "$REPO/.venv/bin/python" ]]; then
    PY="$REPO/.venv/bin/python"
else
    PY="python3"
fi
OUT="${DISTOPT_GPU_CHECK_OUT:-$REPO/gpu-check-out}"
TESTS_S="${DISTOPT_GPU_CHECK_TESTS_S:-240}"
BENCH_S="${DISTOPT_GPU_CHECK_BENCH_S:-210}"
BUDGET_S=480
for v in "$TESTS_S" "$BENCH_S"; do
    [[ "$v" =~ ^[0-9]+$ && "$v" -gt 0 ]] || { echo "[gpu-check] error: stage limits must be positive integers (seconds), got '$v'" >&2; exit 2; }
done
if (( TESTS_S + BENCH_S > BUDGET_S )); then
    echo "[gpu-check] error: stage limits ${TESTS_S}s + ${BENCH_S}s exceed the ${BUDGET_S}s budget" >&2
    exit 2
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "[gpu-check] error: no Python interpreter '$PY' (set DISTOPT_PYTHON or run bash launch/setup.sh test)" >&2
    exit 1
fi
probe="$("$PY" - <<'EOF' 2>&1
import torch
if not torch.cuda.is_available():
    print(f"NOCUDA torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}) sees no CUDA device")
else:
    print(f"CUDA {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{torch.cuda.device_count()} device(s), NCCL {'yes' if torch.distributed.is_nccl_available() else 'no'}")
EOF
)"
rc=$?
if [[ $rc -ne 0 ]]; then
    echo "[gpu-check] error: '$PY' cannot import torch:" >&2
    echo "$probe" >&2
    exit 1
fi
if [[ "$probe" == NOCUDA* ]]; then
    echo "[gpu-check] skipped: ${probe#NOCUDA }; nothing to check without a GPU (exit 0)"
    exit 0
fi
echo "[gpu-check] $probe; budget ${BUDGET_S}s (tests ${TESTS_S}s, bench ${BENCH_S}s); output in $OUT" >&2

tests_cmd=("$PY" -m pytest tests/test_cuda.py "tests/test_bench_step.py::test_bench_step_on_cuda"
           -q -p no:cacheprovider -o "timeout=$TESTS_S" -rfEs)
bench_cmd=("$PY" -m distopt.cli bench step --device cuda --repeats 10 --warmup 3 --format md --progress)
if [[ "${DISTOPT_DRY_RUN:-0}" == "1" ]]; then
    printf '[gpu-check] tests (limit %ss):' "$TESTS_S"; printf ' %q' "${tests_cmd[@]}"; printf '\n'
    printf '[gpu-check] bench (limit %ss):' "$BENCH_S"; printf ' %q' "${bench_cmd[@]}"; printf '\n'
    exit 0
fi

mkdir -p "$OUT"
export DISTOPT_GPU_CHECK_OUT="$OUT"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# one GPU: every test process (the world-size-1 NCCL group included) uses device 0
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
start=$SECONDS
status=()

echo "[gpu-check] 1/2 tests" >&2
timeout --kill-after=10 "$TESTS_S" "${tests_cmd[@]}" 2>&1 | tee "$OUT/tests.log"
rc=${PIPESTATUS[0]}
case $rc in
    0) status+=("tests: passed") ;;
    124|137) status+=("tests: TIMED OUT after ${TESTS_S}s (see $OUT/tests.log)") ;;
    *) status+=("tests: FAILED (pytest exit $rc; see $OUT/tests.log)") ;;
esac

echo "[gpu-check] 2/2 bench step --device cuda" >&2
timeout --kill-after=10 "$BENCH_S" "${bench_cmd[@]}" >"$OUT/bench_step_cuda.md" 2>"$OUT/bench_step_cuda.log"
rc=$?
case $rc in
    0) status+=("bench: done ($OUT/bench_step_cuda.md)") ;;
    124|137) status+=("bench: TIMED OUT after ${BENCH_S}s (rows measured so far in $OUT/bench_step_cuda.log)") ;;
    *) status+=("bench: FAILED (exit $rc; see $OUT/bench_step_cuda.log)") ;;
esac
cat "$OUT/bench_step_cuda.md"

echo
echo "[gpu-check] summary after $((SECONDS - start))s:"
failed=0
for s in "${status[@]}"; do
    echo "  $s"
    [[ "$s" == *passed* || "$s" == *done* ]] || failed=1
done
for f in cases_cuda_vs_cpu.txt world1.txt; do
    [[ -f "$OUT/$f" ]] && { echo "--- $f"; cat "$OUT/$f"; }
done
exit "$failed"
