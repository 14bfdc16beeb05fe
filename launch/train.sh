#!/usr/bin/env bash
# Train the example LM (examples/train.py) under torchrun, after setting up the environment.
#
#   bash launch/train.sh [train.py flags...]       e.g. bash launch/train.sh --max-steps 200
#
# Environment variables (defaults in brackets):
#   NPROC        processes per node [number of GPUs if nvidia-smi sees any, else 2]
#   NNODES       number of nodes [1], or MIN:MAX for an elastic job (e.g. 1:2: a node that
#                fails is dropped and the others continue at the smaller world size)
#   NODE_RANK    this node's rank [0] (informational: the c10d rendezvous assigns node ranks)
#   MASTER_ADDR  rendezvous host: the address of the first node, reachable from every node
#                [127.0.0.1]
#   MASTER_PORT  rendezvous port [29500; on a single node a free port if 29500 is taken]
#   RDZV_ID      rendezvous id, the same on every node [distopt-train]
#   MAX_RESTARTS restarts of the worker group after a failure [0]
#   RDZV_CONF    extra rendezvous settings, e.g. last_call_timeout=5 (seconds an elastic job
#                waits for more nodes once it has the minimum) [torchrun's defaults]
#   SCRIPT       the training script [examples/train.py]
#   SETUP_EXTRAS extras passed to launch/setup.sh [progress]
#   DISTOPT_PYTHON  use this interpreter as is and skip launch/setup.sh (e.g. inside CI/Docker)
# On several nodes run the same command on each, with its NODE_RANK; set GLOO_SOCKET_IFNAME /
# NCCL_SOCKET_IFNAME to the interface of the inter-node network (docs/multinode.md).
# With MAX_RESTARTS > 0 and --save-dir, --resume is added: after a failure torchrun restarts
# every worker and they continue from the newest complete checkpoint.
# setup.sh's own variables (DISTOPT_TORCH_SPEC, DISTOPT_TORCH_INDEX_URL, ...) apply too.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${DISTOPT_PYTHON:-}" ]]; then
    PY="$DISTOPT_PYTHON"
else
    PY="$(bash "$REPO/launch/setup.sh" "${SETUP_EXTRAS:-progress}" | tail -n 1)"
fi

if [[ -z "${NPROC:-}" ]]; then
    ngpu=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        ngpu="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    fi
    if [[ "$ngpu" -gt 0 ]]; then NPROC="$ngpu"; else NPROC=2; fi
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
RDZV_ID="${RDZV_ID:-distopt-train}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
SCRIPT="${SCRIPT:-$REPO/examples/train.py}"
if [[ ! "$NNODES" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]]; then
    echo "[train] error: NNODES must be a node count (2) or MIN:MAX (1:2), got '$NNODES'" >&2
    exit 2
fi

port_free() {
    "$PY" - "$MASTER_ADDR" "$1" <<'PYEOF'
import socket, sys
s = socket.socket()
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
except OSError:
    sys.exit(1)
finally:
    s.close()
PYEOF
}
if [[ -z "${MASTER_PORT:-}" ]]; then
    MASTER_PORT=29500
    # Only on a single node may the port be chosen locally (other nodes could not know it).
    if [[ "$NNODES" == "1" ]] && ! port_free "$MASTER_PORT" 2>/dev/null; then
        MASTER_PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
        echo "[train] port 29500 is busy; using free port $MASTER_PORT" >&2
    fi
fi

rdzv=()
if [[ -n "${RDZV_CONF:-}" ]]; then rdzv=(--rdzv-conf "$RDZV_CONF"); fi

extra=()
if [[ "$MAX_RESTARTS" != "0" ]]; then
    has_save=0; has_resume=0
    for a in "$@"; do
        [[ "$a" == --save-dir || "$a" == --save-dir=* ]] && has_save=1
        [[ "$a" == --resume ]] && has_resume=1
    done
    if [[ "$has_save" == 1 && "$has_resume" == 0 ]]; then extra+=(--resume); fi
fi

cmd=("$PY" -m torch.distributed.run
     --nnodes "$NNODES" --nproc-per-node "$NPROC" --node-rank "$NODE_RANK"
     --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID"
     ${rdzv[@]+"${rdzv[@]}"} --max-restarts "$MAX_RESTARTS"
     "$SCRIPT" "$@" ${extra[@]+"${extra[@]}"})
printf '[train]' >&2
printf ' %q' "${cmd[@]}" >&2
printf '\n' >&2
exec "${cmd[@]}"
