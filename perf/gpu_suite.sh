#!/usr/bin/env bash
# Everything that needs a GPU, in one call on the lent GPU machine (see /work/.library/device/README.md):
#   copy ../shared/device-wheels to .whl/ (git-ignored), then run with carry [".whl"]:
#   bash perf/gpu_suite.sh
# Installs the missing wheels and the project, runs the GPU tests and the GPU smoke runs, and writes the
# results (versions, device, test log, timings) under $OUT (or perf/results/gpu-latest without it).
# Budget: within 8 minutes on one H100/H200 (tests ~2 min with Triton compilation, kernel benchmarks
# ~4 min, smoke runs ~1 min); each step has its own timeout so one hang cannot eat the lease.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-perf/results/gpu-latest}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
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
    echo "command: bash perf/gpu_suite.sh"
} | tee "$OUT/env.txt"
status=0
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/tests_gpu.txt" || status=1
timeout 270 python3 perf/bench_kernels.py --out "$OUT/kernels.md" 2>&1 | tee "$OUT/bench_kernels.txt" || status=1
# The tiny model in bf16 on the GPU, then DeepSeek-V3 layer shapes at reduced depth and expert count
# (random weights: 4 layers, 32 experts; random init of all 256 would take minutes on the host).
# The second run goes through the Triton kernels with CUDA graphs and FP8 experts.
for preset in "model=tiny runtime.kernels=torch" \
        "model=deepseek_v3 model.num_hidden_layers=4 model.n_routed_experts=32 model.max_position_embeddings=4096 runtime.cuda_graphs=true runtime.fp8_experts=true"; do
    timeout 120 python3 -m moe_pd.generate $preset runtime=gpu 'prompt_ids=[[0,1,2,3,4,5,6,7],[0,9,8,7]]' \
        sampling.max_new_tokens=32 sampling.ignore_eos=true kvcache.num_blocks=256 runtime.log_level=INFO \
        2>&1 | tee -a "$OUT/generate_gpu.txt" || status=1
done
exit $status
