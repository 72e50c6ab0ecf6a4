#!/usr/bin/env bash
# Shared by prefill.sh and decode.sh: one instance of a PD cluster as a torchrun job.
# Usage: bash launch/_instance.sh ROLE [Hydra overrides...]
# Environment (all optional):
#   NPROC_PER_NODE  ranks on this node (default 8 with CUDA, else 2)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (default: one node, free ports)
#   RUN_DIR         one hydra.run.dir for every rank (default runs/<role>/<date>)
#   LOG_RANKS       local ranks whose output is shown (default 0; "all" shows every rank); every rank's
#                   stdout and stderr are also kept under $RUN_DIR/ranks/ (torchrun --log-dir --tee)
#   PYTHON          interpreter (default .venv/bin/python, else python3)
set -euo pipefail
ROLE="$1"; shift
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(8 if torch.cuda.is_available() else 2)")
fi
RUN_DIR="${RUN_DIR:-runs/${ROLE}/$(date +%Y-%m-%d_%H-%M-%S)}"
NNODES="${NNODES:-1}"
if [ "$NNODES" = "1" ] && [ -z "${MASTER_ADDR:-}" ]; then
    RDZV=(--standalone)
else
    RDZV=(--nnodes="$NNODES" --node-rank="${NODE_RANK:?set NODE_RANK for a multi-node job}"
          --master-addr="${MASTER_ADDR:?set MASTER_ADDR for a multi-node job}" --master-port="${MASTER_PORT:-29500}")
fi
FILTER=()
[ "${LOG_RANKS:-0}" != "all" ] && FILTER=(--local-ranks-filter="${LOG_RANKS:-0}")
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc-per-node="$NPROC_PER_NODE" "${FILTER[@]}" \
    --log-dir="$RUN_DIR/ranks" --tee=3 \
    -m moe_pd.serve.service --config-name "$ROLE" "hydra.run.dir=$RUN_DIR" "$@"
