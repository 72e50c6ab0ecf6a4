#!/usr/bin/env bash
# Everything that needs a GPU, in one call on the lent GPU machine (see DEVELOPERS.md, "The GPU machine"):
#   copy ../shared/device-wheels to .whl/ (git-ignored), then run with carry [".whl"]:
#   bash perf/gpu_suite.sh                      (SUITE_BUDGET_S=480 by default)
# Installs the missing wheels and the project, then runs, most telling first, each step time-boxed and
# skipped when the budget left cannot hold its time box:
#   1. every Triton kernel compiled ahead of time for this GPU (python -m moe_pd.kernels.aot --arch native)
#   2. tests/gpu/test_kernels_gpu.py (kernels against references, CUDA graph replay, FP8 experts)
#   3. generate smoke runs: the tiny model on torch ops; DeepSeek-V2-Lite widths with CUDA graphs off and
#      on (greedy tokens must be identical); DeepSeek-V3 widths with graphs and FP8 experts
#   4. perf/bench_kernels.py --quick (ceilings, grouped GEMMs, MLA decode, a decode step eager/graphs/FP8)
#   5. tests/gpu/test_dispatch_gpu.py, one process per test (NCCL world of one, NVSHMEM single PE)
# Everything goes under $OUT (or perf/results/gpu-latest without it), written as it runs, so a step that
# hangs or a call that runs out of time still leaves the earlier steps' output.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-perf/results/gpu-latest}"
BUDGET="${SUITE_BUDGET_S:-480}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 TRITON_INTERPRET=0  # compiled kernels, never the interpreter
if ls .whl/*.whl >/dev/null 2>&1; then
    SITE=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl || exit 1
    export PYTHONPATH="$SITE:${PYTHONPATH:-}"
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
{
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    python3 -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
    python3 -c "import triton; print('triton', triton.__version__)" 2>/dev/null
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    echo "command: SUITE_BUDGET_S=$BUDGET bash perf/gpu_suite.sh"
} | tee "$OUT/env.txt"

status=0
summary=()
# step NAME TIMEOUT_S LOG COMMAND...: runs COMMAND under `timeout`, appending to $OUT/LOG.
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    if (( SECONDS + limit > BUDGET )); then
        summary+=("$name: skipped (budget: ${SECONDS}s used of ${BUDGET}s, step needs ${limit}s)")
        status=1
        return
    fi
    local start=$SECONDS
    echo "=== $name (at ${start}s, time box ${limit}s)" | tee -a "$OUT/$log"
    timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee -a "$OUT/$log"  # bash -c: functions too
    local rc=${PIPESTATUS[0]}
    summary+=("$name: rc=$rc in $((SECONDS - start))s")
    (( rc == 0 )) || status=1
}
generate() {  # generate LABEL OVERRIDES...: greedy, 32 new tokens, the output records saved as $OUT/gen_LABEL.jsonl
    local label=$1
    shift
    python3 -m moe_pd.generate "$@" runtime=gpu 'prompt_ids=[[0,1,2,3,4,5,6,7],[0,9,8,7]]' sampling.max_new_tokens=32 \
        sampling.ignore_eos=true kvcache.num_blocks=256 runtime.log_level=INFO output="$OUT/gen_$label.jsonl"
}
same_tokens() {  # same_tokens A B: the greedy tokens of two bf16 runs agree over at least their first 8
    # Random weights leave near-ties among the logits, and graphs replay the masked-layout GEMMs (tiles tuned
    # apart from the contiguous ones), so bf16 rounding may flip a late argmax; a wrong kernel garbles the
    # first tokens. Exact identity is tested in fp32 (test_decode_step_graph_replay_equals_the_eager_step).
    python3 - "$OUT/gen_$1.jsonl" "$OUT/gen_$2.jsonl" <<'PY'
import json, sys
a, b = ([json.loads(line)["output_ids"] for line in open(p)] for p in sys.argv[1:])
agree = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), len(p)) for p, q in zip(a, b)]
print(f"greedy tokens agree over the first {agree} of {[len(p) for p in a]} per prompt")
sys.exit(0 if len(a) == len(b) > 0 and min(agree) >= 8 else 1)
PY
}
export OUT
export -f generate same_tokens

step "aot compile (native)" 120 aot.txt python3 -m moe_pd.kernels.aot --arch native --jobs 16
step "tests/gpu kernels" 150 tests_gpu.txt python3 -m pytest -v -rA --tb=short --timeout 90 -p no:cacheprovider \
    tests/gpu/test_kernels_gpu.py
step "generate tiny (torch ops)" 60 generate.txt generate tiny model=tiny runtime.kernels=torch
V2L="model=deepseek_v2_lite model.num_hidden_layers=2 model.max_position_embeddings=4096"
step "generate V2-Lite widths, graphs off" 75 generate.txt generate v2l_eager $V2L runtime.cuda_graphs=false
step "generate V2-Lite widths, graphs on" 75 generate.txt generate v2l_graphs $V2L runtime.cuda_graphs=true
step "V2-Lite graphs on/off tokens" 20 generate.txt same_tokens v2l_eager v2l_graphs
step "generate V3 widths, graphs + FP8 experts" 90 generate.txt generate v3_fp8 model=deepseek_v3 \
    model.num_hidden_layers=3 model.n_routed_experts=16 model.max_position_embeddings=4096 runtime.cuda_graphs=true \
    runtime.fp8_experts=true
step "bench_kernels --quick" 180 bench_kernels.txt python3 perf/bench_kernels.py --quick --out "$OUT/kernels.md"
step "dispatch: NCCL world of one" 60 tests_dispatch.txt python3 -m pytest -v -rA --tb=short --timeout 45 \
    -p no:cacheprovider tests/gpu/test_dispatch_gpu.py -k nccl
step "dispatch: NVSHMEM single PE" 60 tests_dispatch.txt python3 -m pytest -v -rA --tb=short --timeout 45 \
    -p no:cacheprovider tests/gpu/test_dispatch_gpu.py -k nvshmem

printf '%s\n' "" "summary (${SECONDS}s):" "${summary[@]}" | tee "$OUT/summary.txt"
exit $status
