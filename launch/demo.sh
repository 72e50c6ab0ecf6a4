#!/usr/bin/env bash
# The main job on this machine: set up .venv, start the whole PD cluster (router + prefill 2 ranks + decode
# 4 ranks, EP 4, CPU/gloo) on the trained tiny DeepSeek-V3-shaped checkpoint in moe_pd/assets/tiny_dsv3
# (docs/tiny_checkpoint.md), send a few requests with the openai client (one streaming), print the answers
# and a metrics summary, and shut the cluster down.
# Arguments are passed to launch/local.sh as Hydra overrides, e.g. `bash launch/demo.sh model.path=/ckpt`
# (any model override replaces the trained checkpoint).
# ROUTER_PORT/PREFILL_PORT/DECODE_PORT choose the ports (defaults 8000/9100/9200).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh demo
export RUN_DIR="${RUN_DIR:-runs/demo/$(date +%Y-%m-%d_%H-%M-%S)}"
mkdir -p "$RUN_DIR"
MODEL=(model=path "model.path=$PWD/moe_pd/assets/tiny_dsv3")
for arg in "$@"; do case "$arg" in model=*|model.*|+model.*) MODEL=() ;; esac; done
bash launch/local.sh "${MODEL[@]}" "$@" > "$RUN_DIR/local.out" 2>&1 &
CLUSTER=$!
trap 'kill -TERM $CLUSTER 2>/dev/null; wait $CLUSTER 2>/dev/null || true; echo "cluster stopped (logs in $RUN_DIR)"' EXIT
echo "starting the local PD cluster (logs in $RUN_DIR) ..."
while ! grep -q "cluster ready" "$RUN_DIR/local.out" 2>/dev/null; do
    if ! kill -0 $CLUSTER 2>/dev/null; then cat "$RUN_DIR/local.out" >&2; exit 1; fi
    sleep 0.5
done
grep "cluster ready" "$RUN_DIR/local.out"
.venv/bin/python launch/demo_client.py --url "http://127.0.0.1:${ROUTER_PORT:-8000}"
