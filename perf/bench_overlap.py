"""Overlapped (two micro-batches) vs plain forward under expert parallelism, with and without an injected
all-to-all delay, and the report tool's hidden-communication fraction for each run.

    python perf/bench_overlap.py [--ranks 4] [--iters 5]

Runs itself under torchrun (gloo on CPU). A DeepSeek-V3-shaped model, small enough for CPU, random weights;
each rank runs a prefill step (2 prompts x 256 tokens) and a decode step (256 sequences, 32 cached tokens).
The injected latency (testing.comm_delay_ms, added to each all-to-all's real completion) is 0, then 1x and
2x the per-stage compute time measured from the traces of the overlapped run (the work one micro-batch does
between two yields, which is what can hide a transfer of the other). Prints medians, the plain/overlapped
ratio (> 1: overlap faster) and the fraction of all-to-all time hidden under compute (report tool), all
from the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torchrun_launch import run_workers, worker_or_args

OVERRIDES = ["model.hidden_size=512", "model.intermediate_size=1024", "model.moe_intermediate_size=256",
             "model.num_attention_heads=8", "model.q_lora_rank=128", "model.kv_lora_rank=64",
             "model.qk_nope_head_dim=32", "model.qk_rope_head_dim=16", "model.v_head_dim=32",
             "model.num_hidden_layers=4"]


def worker(args) -> None:
    from hydra import compose, initialize_config_module

    from moe_pd.config import ParallelConfig
    from moe_pd.config.overlap import ProfileConfig
    from moe_pd.config.store import register_configs, to_config
    from moe_pd.kvcache.paged import AttentionBatch, PagedLatentCache
    from moe_pd.model.loader import build_model
    from moe_pd.overlap.micro_batch import split_step
    from moe_pd.overlap.schedule import DECODE, PREFILL, forward_two_micro_batches
    from moe_pd.parallel.dispatch import make_dispatcher
    from moe_pd.parallel.state import default_placement, init_parallel
    from moe_pd.profiling.profiler import RankProfiler
    from moe_pd.profiling.report import analyse, find_traces, hidden_fraction, load_events, rank_of

    register_configs()
    with initialize_config_module("moe_pd.conf", version_base=None):
        cfg = to_config(compose("generate", overrides=OVERRIDES)).model
    torch.set_num_threads(1)
    state = init_parallel(ParallelConfig(), cfg, torch.device("cpu"))
    placement = default_placement(state, cfg)
    dispatcher = make_dispatcher(ParallelConfig(), state, cfg.hidden_size, placement)
    model = build_model(cfg, dispatcher=dispatcher, expert_ids=lambda layer: placement.rank_experts(state.rank, layer))
    gen = torch.Generator().manual_seed(state.rank)
    block = 16
    steps = {
        "prefill": (torch.randint(0, 256, (512,), generator=gen),
                    AttentionBatch.build([list(range(0, 16)), list(range(16, 32))], [0, 0], [256, 256], block)),
        "decode": (torch.randint(0, 256, (256,), generator=gen),
                   AttentionBatch.build([list(range(32 + 3 * i, 32 + 3 * (i + 1))) for i in range(256)], [32] * 256,
                                        [1] * 256, block)),
    }
    cache = PagedLatentCache(cfg.num_hidden_layers, 32 + 3 * 256, block, cfg.kv_lora_rank, cfg.qk_rope_head_dim)

    def run(phase: str, overlapped: bool) -> None:
        ids, batch = steps[phase]
        dispatcher.begin_step(ids.shape[0])  # every rank runs the same token count here
        with torch.inference_mode():
            if overlapped:
                schedule = PREFILL if phase == "prefill" else DECODE
                forward_two_micro_batches(model, split_step(ids, batch), cache, schedule)
            else:
                model(ids, batch, cache)

    def timed(phase: str, overlapped: bool) -> float:
        times = []
        for _ in range(args.iters + 1):
            dist.barrier()
            t0 = time.perf_counter()
            run(phase, overlapped)
            dist.barrier()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    def profiled(phase: str, overlapped: bool, tmp: str) -> dict:
        prof = RankProfiler(ProfileConfig(enabled=True, wait=0, warmup=1, active=2), tmp, phase, state.rank)
        with prof:
            for _ in range(3):
                run(phase, overlapped)
                prof.step()
        dist.barrier()
        traces = find_traces(Path(tmp) / "profile" / phase)
        return analyse({rank_of(t): load_events(t) for t in traces})

    def shared_tmp() -> str:
        name = [tempfile.mkdtemp() if state.rank == 0 else None]
        dist.broadcast_object_list(name, 0)
        return name[0]

    rows = []
    for phase in ("prefill", "decode"):
        # Per-stage compute: the labelled compute of the overlapped run without delay (ATTN-0, ATTN-1, SHARED,
        # MLP, OUTPUT ranges in the traces, averaged over ranks) divided by the chunks both micro-batches run
        # between yields: the work that can hide one transfer of the other micro-batch.
        dispatcher.delay_s = 0.0
        schedule = PREFILL if phase == "prefill" else DECODE
        chunks = 2 * (len(schedule.yield_after) * cfg.num_hidden_layers + 1)
        stats = profiled(phase, True, shared_tmp() + "/calibrate")
        compute_us = sum(sum(stages.values()) for stages in stats["compute"].values())
        per_stage = compute_us / 1e6 / (2 * state.world_size) / chunks  # 2 profiled steps, summed over ranks
        for delay in (0.0, per_stage, 2 * per_stage):
            delay_t = torch.tensor([delay])
            dist.broadcast(delay_t, 0)  # every rank uses rank 0's estimate
            dispatcher.delay_s = float(delay_t)
            plain, overlapped = timed(phase, False), timed(phase, True)
            tmp = shared_tmp()
            h_plain = hidden_fraction(profiled(phase, False, tmp + "/plain")["comm"])
            h_over = hidden_fraction(profiled(phase, True, tmp + "/overlap")["comm"])
            rows.append((phase, float(delay_t) * 1e3, plain * 1e3, overlapped * 1e3, h_plain, h_over))
    if state.rank == 0:
        for phase, delay, plain, over, h_plain, h_over in rows:
            print(f"{phase:8} {delay:9.2f} {plain:9.1f} {over:11.1f} {plain / over:7.2f}x {h_plain:12.1%} "
                  f"{h_over:15.1%}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--iters", type=int, default=5)
    args = worker_or_args(parser, worker)
    if args is None:
        return
    print(f"overlap benchmark: {args.ranks} ranks, gloo on CPU, torch {torch.__version__}, median of {args.iters}; "
          "delay = latency added to each all-to-all (0, 1x and 2x the measured per-stage compute)")
    print(f"{'phase':8} {'delay ms':>9} {'plain ms':>9} {'overlap ms':>11} {'ratio':>8} {'hidden plain':>12} "
          f"{'hidden overlap':>15}", flush=True)
    run_workers(__file__, [args.ranks], ["--iters", str(args.iters)])


if __name__ == "__main__":
    main()
