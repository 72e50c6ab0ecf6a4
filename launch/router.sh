#!/usr/bin/env bash
# The router (one process). Arguments are Hydra overrides of conf/router.yaml, e.g.
#   bash launch/router.sh 'prefill=[tcp://10.0.0.1:9100]' 'decode=[tcp://10.0.1.1:9200]' host=0.0.0.0 port=8000
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" -m moe_pd.serve.router "hydra.run.dir=${RUN_DIR:-runs/router/$(date +%Y-%m-%d_%H-%M-%S)}" "$@"
