"""Measures the per-op costs of this machine for the planner's CPU preset (conf/hardware/cpu.yaml).

    python perf/calibrate_cpu.py              # prints the preset's measured fields as YAML
    python perf/calibrate_cpu.py --write      # and writes them into conf/hardware/cpu.yaml

One thread per rank, fp32, as the PD cluster runs here (launch/local.sh):
- GEMM: torch.mm at the tiny model's widths (rows x 64 by 64 x 128) -> flops_bf16 (the rate of the dtype
  the CPU runs; the field keeps its GPU name), eff_gemm 1;
- attention: causal scaled_dot_product_attention at the tiny model's head widths -> eff_attn (its rate over
  the GEMM rate);
- memory: a 64 MB copy -> hbm_bw;
- per-layer and per-step host costs: the offline engine's decode step at batch 1 with the tiny model at 3
  and at 6 layers: slope -> op_overhead_us, intercept -> step_overhead_ms;
- gloo: all_to_all_single among 2..5 ranks (torchrun): small payloads -> comm_latency_us +
  comm_latency_per_peer_us * (ranks - 1) by least squares; 4 MB per peer -> nvlink_bw (loopback bytes/s).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torchrun_launch import torchrun, worker_or_args

PRESET = Path(__file__).resolve().parents[1] / "conf" / "hardware" / "cpu.yaml"


def timed(fn, repeats: int = 30, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_flops(rows: int = 2048) -> float:
    a, b = torch.randn(rows, 64), torch.randn(64, 128)
    return 2 * rows * 64 * 128 / timed(lambda: a @ b)


def attention_flops(tokens: int = 256, heads: int = 4) -> float:
    q, k = torch.randn(1, heads, tokens, 24), torch.randn(1, heads, tokens, 24)
    v = torch.randn(1, heads, tokens, 16)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    flops = 2 * heads * (24 + 16) * tokens * (tokens + 1) / 2  # causal: query i sees i + 1 keys
    return flops / timed(lambda: sdpa(q, k, v, is_causal=True))


def copy_bandwidth(n: int = 16 << 20) -> float:
    a, b = torch.randn(n), torch.empty(n)
    return 2 * 4 * n / timed(lambda: b.copy_(a), repeats=10)


def decode_step_seconds(layers: int) -> float:
    """Median seconds of one decode step of the tiny model (offline engine, batch 1, one process)."""
    from hydra import compose, initialize_config_module

    from moe_pd.config.kvcache import KVCacheConfig
    from moe_pd.config.sampling import SamplingConfig
    from moe_pd.config.store import register_configs, to_config
    from moe_pd.engine.offline import OfflineEngine
    from moe_pd.model.loader import build_model

    register_configs()
    with initialize_config_module("moe_pd.conf", version_base=None):
        cfg = to_config(compose("generate", overrides=[f"model.num_hidden_layers={layers}"])).model
    engine = OfflineEngine(build_model(cfg), KVCacheConfig(block_size=16, num_blocks=256), max_batch_size=1)
    sampling = SamplingConfig(max_new_tokens=64, ignore_eos=True)
    runs = []
    for _ in range(5):
        before = (engine.stats.decode_s, engine.stats.decode_tokens)
        engine.generate([[256, *range(10, 40)]], sampling)
        runs.append((engine.stats.decode_s - before[0]) / (engine.stats.decode_tokens - before[1]))
    return statistics.median(runs[1:])


def worker(args) -> None:
    import torch.distributed as dist

    from moe_pd.parallel.state import join_process_group

    join_process_group("gloo")
    world = dist.get_world_size()
    small = torch.randn(world * 8 * 64)  # 8 tokens of the tiny model per peer
    big = torch.randn(world * (1 << 20))  # 4 MB per peer
    out_small, out_big = torch.empty_like(small), torch.empty_like(big)

    def exchange(a, b):
        dist.barrier()
        start = time.perf_counter()
        dist.all_to_all_single(b, a)
        return time.perf_counter() - start

    lat = statistics.median(exchange(small, out_small) for _ in range(200))
    big_s = statistics.median(exchange(big, out_big) for _ in range(10))
    if dist.get_rank() == 0:
        print(f"ranks {world} latency_us {1e6 * lat:.1f} bytes_per_s {4 * (world - 1) * (1 << 20) / big_s:.1f}")
    dist.destroy_process_group()


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="write the figures into conf/hardware/cpu.yaml")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3, 4, 5])
    args = worker_or_args(parser, worker)
    if args is None:
        return
    torch.set_num_threads(1)
    gemm = gemm_flops()
    attn = attention_flops()
    copy = copy_bandwidth()
    three, six = decode_step_seconds(3), decode_step_seconds(6)
    per_layer = (six - three) / 3
    per_step = three - 3 * per_layer
    lat, bw = {}, []
    for ranks in args.ranks:
        out = torchrun(ranks, [__file__, "--worker"], capture_output=True, text=True, timeout=300, check=True).stdout
        found = re.search(r"latency_us ([\d.]+) bytes_per_s ([\d.]+)", out)
        lat[ranks] = float(found.group(1))
        bw.append(float(found.group(2)))
    base, per_peer = fit_line([r - 1 for r in lat], list(lat.values()))
    fields = {
        "flops_bf16": round(gemm / 1e12, 6), "eff_attn": round(min(1.0, attn / gemm), 4),
        "hbm_bw": round(copy / 1e9, 3), "nvlink_bw": round(statistics.median(bw) / 1e9, 4),
        "rdma_bw": round(statistics.median(bw) / 1e9, 4),
        "op_overhead_us": round(1e6 * per_layer, 1), "step_overhead_ms": round(1e3 * max(per_step, 0.0), 3),
        "comm_latency_us": round(max(base, 0.0), 1), "comm_latency_per_peer_us": round(max(per_peer, 0.0), 1),
    }
    print(f"# torch {torch.__version__}, one thread; GEMM {gemm / 1e9:.2f} GFLOP/s, attention {attn / 1e9:.2f} "
          f"GFLOP/s, copy {copy / 1e9:.2f} GB/s; decode step at batch 1: {1e3 * three:.2f} ms (3 layers), "
          f"{1e3 * six:.2f} ms (6 layers); all_to_all latency by ranks (us): "
          + ", ".join(f"{r}: {v:.0f}" for r, v in lat.items()))
    for name, value in fields.items():
        print(f"{name}: {value}")
    if args.write:
        text = PRESET.read_text()
        for name, value in fields.items():
            text = re.sub(rf"^{name}: .*$", f"{name}: {value}", text, flags=re.M)
        PRESET.write_text(text)
        print(f"wrote {PRESET}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
