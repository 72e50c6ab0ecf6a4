#!/usr/bin/env bash
# The main job on this machine: set up .venv, then generate with the tiny DeepSeek-V3-shaped model on CPU.
# Extra arguments are Hydra overrides, e.g. `bash launch/demo.sh sampling.temperature=0.8`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
exec .venv/bin/python -m moe_pd.generate \
    'prompts=["Hello, moe_pd!", "Prefill and decode run on separate clusters because", "1, 2, 3,"]' \
    sampling.max_new_tokens=24 "$@"
