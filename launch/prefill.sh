#!/usr/bin/env bash
# A prefill instance (torchrun job). Arguments are Hydra overrides of conf/prefill.yaml, e.g.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/prefill.sh model=deepseek_v3 runtime=gpu host=0.0.0.0
# Environment: see launch/_instance.sh. The leader prints the address routers connect to.
exec bash "$(dirname "$0")/_instance.sh" prefill "$@"
