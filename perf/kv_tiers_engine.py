"""The multi-turn workload through the serving engine: TTFT, throughput and hit rate of the KV tiers
(perf/bench_kv_tiers.py runs it after its block-manager replay).

Each configuration is a real LLMEngine (the tiny model, CPU, fp32, 16-token pages) whose scheduler
promotes prefixes from host DRAM / disk (PROMOTING, the load-or-recompute cost model on measured rates)
and offers pages as they fill (write-through): the code that serves. The sessions and their arrival order
are perf/kv_workload.py's; each turn's prompt is the conversation so far with the model's own answers (of
the workload's lengths, greedy), so a turn can hit the previous turn's prompt + answer. Requests run one
at a time in arrival order (the think time between turns is not waited out; the tier thread finishes its
writes between requests, as it has seconds to at real arrival rates, unless --no-drain): TTFT is the time
from add_request to the first token, i.e. the prefill or the promotion plus the rest of the prompt, with
no queueing. Throughput: prompt + generated tokens over the replay's wall time. "ideal" is the same engine
with a device pool that holds everything (no tiers). Every configuration must produce the same tokens.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from kv_workload import HitRate, Turn, WorkloadSpec, multi_turn

from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.engine.core.request import SamplingParams
from moe_pd.engine.llm_engine import LLMEngine
from moe_pd.kvcache.block_manager import full_pages


@dataclass
class EngineResult(HitRate):
    name: str
    prompt_tokens: int = 0
    generated: int = 0
    hit_tokens: dict[str, int] = field(default_factory=dict)
    ttft_s: list[float] = field(default_factory=list)
    seconds: float = 0.0
    outputs: list[list[int]] = field(default_factory=list)
    tiers: dict = field(default_factory=dict)
    pages: set = field(default_factory=set)
    """The distinct full pages of every prompt and answer (the working set)."""

    def ttft(self, q: float) -> float:
        return statistics.quantiles(self.ttft_s, n=100, method="inclusive")[round(q * 100) - 1]

    @property
    def throughput(self) -> float:
        return (self.prompt_tokens + self.generated) / self.seconds


def user_messages(turns: list[Turn]) -> list[tuple[Turn, tuple[int, ...]]]:
    """Each turn with what it adds to its session's conversation (the system prompt too, on turn 0)."""
    last: dict[int, Turn] = {}
    out = []
    for t in turns:
        prev = last.get(t.session)
        out.append((t, t.prompt[len(prev.prompt) + len(prev.output):] if prev else t.prompt))
        last[t.session] = t
    return out


def engine_replay(name: str, model, turns: list[Turn], args, device_pages: int, dram_pages: int,
                  disk_pages: int, work: Path) -> EngineResult:
    bs = args.block_size
    page_bytes = model.cfg.num_hidden_layers * bs * (model.cfg.kv_lora_rank + model.cfg.qk_rope_head_dim) * 4
    kv = KVCacheConfig(block_size=bs, num_blocks=device_pages, host_tier_gib=dram_pages * page_bytes / 2**30,
                       host_tier_path=str(work / f"engine-{name}.pool"),
                       disk_tier_dir=str(work / f"engine-{name}.disk") if disk_pages else "",
                       disk_tier_gib=max(disk_pages, 1) * (page_bytes + 1024) / 2**30)
    engine = LLMEngine(model, kv, 4, 2048)
    result, context = EngineResult(name), {}
    t_start = time.perf_counter()
    for i, (turn, message) in enumerate(user_messages(turns)):
        prompt = context.get(turn.session, []) + list(message)
        t0 = time.perf_counter()
        req = engine.add_request(f"r{i}", prompt, len(turn.output), SamplingParams(), ignore_eos=True)
        while not req.output_ids:
            engine.step()
        result.ttft_s.append(time.perf_counter() - t0)
        while engine.has_work:
            engine.step()
        result.prompt_tokens += len(prompt)
        result.generated += len(req.output_ids)
        result.outputs.append(list(req.output_ids))
        context[turn.session] = prompt + list(req.output_ids)
        result.pages.update(h for h, _ in full_pages(context[turn.session][:-1], bs))  # the last one has no KV
        if engine.tiers is not None and args.drain:
            pause = time.perf_counter()
            engine.tiers.flush()  # the think time the replay skips: not part of the run's wall time
            t_start += time.perf_counter() - pause
    result.seconds = time.perf_counter() - t_start
    result.hit_tokens = {k: v for k, v in engine.requests.cached_by_source.items() if v}
    result.tiers = engine.tier_usage()
    engine.close()
    return result


def engine_bench(args, work: Path) -> list[EngineResult]:
    """tiers off / DRAM / DRAM+disk / ideal through the engine; prints the table and the goals."""
    from bench_generate import tiny_config

    from moe_pd.model.loader import build_model

    turns = multi_turn(WorkloadSpec(sessions=args.engine_sessions, turns=args.engine_turns, system_len=256,
                                    user_len=(16, 48), output_len=(8, 24), think_s=args.think_s,
                                    session_rate=args.session_rate, vocab=256, seed=args.seed))
    torch.manual_seed(0)
    model = build_model(tiny_config())
    dp, dram = args.engine_device_pages, args.engine_dram_pages
    engine_replay("warm-up", model, turns[:4], args, dp, 0, 0, work)  # allocator, thread pools
    results = [engine_replay("tiers off", model, turns, args, dp, 0, 0, work),
               engine_replay("DRAM", model, turns, args, dp, dram, 0, work),
               engine_replay("DRAM+disk", model, turns, args, dp, dram, args.engine_disk_pages, work),
               engine_replay("ideal (unbounded)", model, turns, args, args.engine_ideal_pages, 0, 0, work)]
    working = len(results[0].pages)
    print(f"\nthrough the engine (tiny model, CPU, {torch.get_num_threads()} thread(s)): {len(turns)} requests, "
          f"{args.engine_sessions} sessions x {args.engine_turns} turns, one at a time in arrival order; working set "
          f"{working} pages = {working / dp:.1f}x the device pool of {dp}; DRAM {dram}, disk {args.engine_disk_pages}")
    print(f"{'configuration':<18} {'hit rate':>8} {'/ideal':>7} {'device':>7} {'dram':>7} {'disk':>7} "
          f"{'computed':>9} {'TTFT p50':>9} {'p99':>7} {'tok/s':>7}")
    best, off = results[-1].hit_rate, results[0]
    for r in results:
        print(f"{r.name:<18} {r.hit_rate:>8.3f} {r.hit_rate / best:>7.3f} {r.hit_tokens.get('device', 0):>7} "
              f"{r.hit_tokens.get('dram', 0):>7} {r.hit_tokens.get('disk', 0):>7} {r.prompt_tokens - r.hits:>9} "
              f"{r.ttft(0.5) * 1e3:>7.1f}ms {r.ttft(0.99) * 1e3:>5.1f}ms {r.throughput:>7.0f}")
    same = all(r.outputs == off.outputs for r in results)
    tiered = results[2]
    speedup = off.ttft(0.5) / tiered.ttft(0.5)
    print(f"tokens identical in every configuration: {same}")
    print(f"DRAM+disk: {tiered.hit_rate / best:.1%} of the ideal hit rate (goal >= 90%: "
          f"{'met' if tiered.hit_rate >= 0.9 * best else 'missed'}); TTFT p50 {speedup:.2f}x better than tiers off "
          f"(goal >= 2x: {'met' if speedup >= 2 else 'missed'}); p99 {off.ttft(0.99) / tiered.ttft(0.99):.2f}x; "
          f"throughput {tiered.throughput / off.throughput:.2f}x", file=sys.stdout)
    return results
