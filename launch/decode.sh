#!/usr/bin/env bash
# A decode instance (torchrun job). Arguments are Hydra overrides of conf/decode.yaml, e.g.
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.1.1 bash launch/decode.sh model=deepseek_v3 runtime=gpu host=0.0.0.0 \
#       kv_host=0.0.0.0 advertise_host=$(hostname -i)
# Environment: see launch/_instance.sh. The leader prints the address routers connect to.
exec bash "$(dirname "$0")/_instance.sh" decode "$@"
