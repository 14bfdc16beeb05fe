#!/usr/bin/env bash
# Train the transformers.Trainer example (examples/trainer_train.py: a tiny GPT-2 built in code,
# DistoptTrainer with distopt ZeRO) under torchrun or `accelerate launch`.
#
#   bash launch/trainer.sh [trainer_train.py flags...]   e.g. bash launch/trainer.sh --optim lamb --zero 2
#   LAUNCHER=accelerate bash launch/trainer.sh --zero 1
#
# Environment variables (defaults in brackets):
#   LAUNCHER          torchrun | accelerate [torchrun]
#   torchrun: every variable of launch/train.sh (NPROC, NNODES, NODE_RANK, MASTER_ADDR,
#                     MASTER_PORT, RDZV_ID, MAX_RESTARTS, ...); with MAX_RESTARTS > 0 and
#                     --save-dir, --resume is added and a restarted job continues from the
#                     newest Trainer checkpoint.
#   accelerate:       ACCELERATE_CONFIG [launch/accelerate/multi-gpu.yaml with GPUs, else
#                     launch/accelerate/multi-cpu.yaml with ACCELERATE_USE_CPU=1], NPROC
#                     [GPUs, else 2], MASTER_PORT [a free port]
#   SETUP_EXTRAS      extras for launch/setup.sh [test,reference: transformers + accelerate]
#   DISTOPT_PYTHON    use this interpreter as is and skip launch/setup.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="$REPO/examples/trainer_train.py"
LAUNCHER="${LAUNCHER:-torchrun}"
if [[ -n "${DISTOPT_PYTHON:-}" ]]; then
    PY="$DISTOPT_PYTHON"
else
    PY="$(bash "$REPO/launch/setup.sh" "${SETUP_EXTRAS:-test,reference}" | tail -n 1)"
fi

case "$LAUNCHER" in
torchrun)
    DISTOPT_PYTHON="$PY" SCRIPT="$SCRIPT" exec bash "$REPO/launch/train.sh" "$@"
    ;;
accelerate)
    ngpu=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        ngpu="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    fi
    if [[ -z "${ACCELERATE_CONFIG:-}" ]]; then
        if [[ "$ngpu" -gt 0 ]]; then
            ACCELERATE_CONFIG="$REPO/launch/accelerate/multi-gpu.yaml"
        else
            ACCELERATE_CONFIG="$REPO/launch/accelerate/multi-cpu.yaml"
            export ACCELERATE_USE_CPU=1   # see multi-cpu.yaml: each process joins a gloo group
        fi
    fi
    if [[ -z "${NPROC:-}" ]]; then
        if [[ "$ngpu" -gt 0 ]]; then NPROC="$ngpu"; else NPROC=2; fi
    fi
    if [[ -z "${MASTER_PORT:-}" ]]; then
        MASTER_PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
    fi
    cmd=("$PY" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG"
         --num_processes "$NPROC" --main_process_port "$MASTER_PORT" "$SCRIPT" "$@")
    printf '[trainer]' >&2
    printf ' %q' "${cmd[@]}" >&2
    printf '\n' >&2
    exec "${cmd[@]}"
    ;;
*)
    echo "[trainer] error: LAUNCHER must be torchrun or accelerate, got '$LAUNCHER'" >&2
    exit 2
    ;;
esac
