"""The KV tiers on a multi-turn workload: hit rate at the storage + block-manager level, then hit rate, TTFT
and throughput through the engine (perf/kv_tiers_engine.py).

    python perf/bench_kv_tiers.py                       # tiers off / DRAM / DRAM+disk / unbounded ideal
    python perf/bench_kv_tiers.py --sessions 96 --device-pages 300 --dram-pages 1200 --no-engine

The workload (perf/kv_workload.py): sessions on a few shared system prompts whose context grows turn by
turn, think time between turns, a working set at least ten times the device pool. Each configuration
replays the same requests through a real BlockManager, a CPU PagedLatentCache and, for the tiered ones, a
real TierManager (the shared DRAM pool file, the disk directory): a request takes its device hits, looks
up and promotes its tier hits, 'computes' the rest (every page is filled with a value derived from its
chained hash, and every promoted page is checked against it), registers prompt and answer pages, and
offers the new full pages to the tiers (write-through). The last `--running` requests keep their pages
referenced, as a running batch would; the tier thread finishes its writes between requests (--no-drain
replays faster than a disk could follow, and shows what backpressure drops). The ideal is an unbounded
cache: every full page ever computed is a hit. Printed: hit rate (prompt tokens served from a cache),
split by where the pages came from, prefill tokens computed, and the ratio to the ideal; the goal is
DRAM+disk >= 90% of the ideal's hit rate. Then LRU against Belady's MIN on one cache of device + DRAM
pages (perf/kv_policy_bound.py): the headroom a smarter eviction policy could have. Then the same kind of
workload (smaller: the engine computes every token) through LLMEngine with the tiny model; the goals are
checked there too: DRAM+disk >= 90% of the ideal's hit rate and TTFT p50 >= 2x better than tiers off.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from kv_policy_bound import replay as policy_replay
from kv_tiers_engine import engine_bench
from kv_workload import HitRate, Turn, WorkloadSpec, multi_turn, working_set_pages

from moe_pd.kvcache.block_manager import BlockManager, OutOfBlocks, full_pages
from moe_pd.kvcache.paged import PagedLatentCache
from moe_pd.kvcache.tiers.identity import ModelIdentity
from moe_pd.kvcache.tiers.manager import TierManager

LAYERS, LATENT, ROPE = 2, 12, 4


@dataclass
class Result(HitRate):
    name: str
    prompt_tokens: int = 0
    hit_tokens: dict[str, int] = field(default_factory=lambda: {"device": 0, "dram": 0, "disk": 0})
    wrong_pages: int = 0
    seconds: float = 0.0
    tiers: dict = field(default_factory=dict)


def fill_value(page_hash: int) -> float:
    return float(page_hash & 0xFFFF)


def replay(name: str, turns: list[Turn], args, dram_pages: int, disk_pages: int, work: Path) -> Result:
    bs = args.block_size
    cache = PagedLatentCache(LAYERS, args.device_pages, bs, LATENT, ROPE)
    identity = ModelIdentity("bench", "random:0", "float32", f"mla:L={LAYERS}:row={LATENT}+{ROPE}:LSW", bs)
    tiered = dram_pages > 0 or disk_pages > 0
    alloc = BlockManager(args.device_pages, bs, tier_root=identity.digest if tiered else None)
    page_bytes = LAYERS * bs * (LATENT + ROPE) * 4
    tiers = TierManager(cache, identity, dram_pages * page_bytes, str(work / f"{name}.pool"),
                        str(work / f"{name}.disk") if disk_pages else "", disk_pages * (page_bytes + 1024)) \
        if tiered else None
    result, running = Result(name), deque()
    t0 = time.perf_counter()
    for turn in turns:
        tokens = list(turn.prompt)
        hits = alloc.cached_prefix(tokens)
        found = tiers.lookup(alloc.tier_entries(tokens, hits)) if tiers else []
        while True:
            try:
                table, _ = alloc.admit(tokens, len(tokens) + len(turn.output), hits)
                break
            except OutOfBlocks:
                if not running:
                    raise
                alloc.free(running.popleft())
        promoted = 0
        if found:
            promotion = tiers.promote([(table[len(hits) + i], entry) for i, (_, entry) in enumerate(found)])
            promoted = promotion.wait(timeout=60)
            for tier in ("dram", "disk"):
                result.hit_tokens[tier] += promotion.sources[:promoted].count(tier) * bs
        result.prompt_tokens += len(tokens)
        result.hit_tokens["device"] += len(hits) * bs
        first = len(hits) + promoted  # the first page this request computes
        full = tokens + list(turn.output)
        alloc.commit(table, full, len(full))
        for i in range(len(hits), first):  # promoted pages must hold what was computed for their prefix
            result.wrong_pages += not bool((cache.kv_LPSW[:, table[i]] == fill_value(alloc.pages[table[i]].hash)).all())
        for i in range(first, len(full) // bs):
            cache.kv_LPSW[:, table[i]] = fill_value(alloc.pages[table[i]].hash)
        if tiers:
            tiers.offer(alloc.take_new_pages())
            if args.drain:
                tiers.flush()
        running.append(table)
        if len(running) > args.running:
            alloc.free(running.popleft())
    result.seconds = time.perf_counter() - t0
    if tiers:
        tiers.flush()
        result.tiers = {**tiers.stats.snapshot(), "usage": tiers.usage()}
        tiers.close()
    return result


def ideal(turns: list[Turn], bs: int) -> Result:
    """An unbounded cache: every full page of every earlier prompt and answer is a hit."""
    seen, result = set(), Result("ideal (unbounded)")
    for turn in turns:
        tokens = list(turn.prompt)
        hit = 0
        for h, _ in full_pages(tokens[: (len(tokens) - 1) // bs * bs], bs):
            if h not in seen:
                break
            hit += bs
        result.prompt_tokens += len(tokens)
        result.hit_tokens["device"] += hit
        seen.update(h for h, _ in full_pages(tokens + list(turn.output), bs))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=48)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--think-s", type=float, default=8.0, help="mean think time between turns")
    parser.add_argument("--session-rate", type=float, default=2.0, help="sessions starting per second")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--device-pages", type=int, default=200, help="the device KV pool (pages)")
    parser.add_argument("--dram-pages", type=int, default=800, help="the DRAM tier (pages)")
    parser.add_argument("--disk-pages", type=int, default=4000, help="the disk tier (pages)")
    parser.add_argument("--running", type=int, default=2, help="requests whose pages stay referenced")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drain", action=argparse.BooleanOptionalAction, default=True,
                        help="let the tier thread finish between requests (the disk keeps up, as it does at "
                             "real arrival rates); --no-drain replays as fast as the CPU allows")
    parser.add_argument("--engine", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the workload through the engine (TTFT, throughput)")
    parser.add_argument("--engine-sessions", type=int, default=32)
    parser.add_argument("--engine-turns", type=int, default=4)
    parser.add_argument("--engine-device-pages", type=int, default=40)
    parser.add_argument("--engine-dram-pages", type=int, default=160)
    parser.add_argument("--engine-disk-pages", type=int, default=2000)
    parser.add_argument("--engine-ideal-pages", type=int, default=4096)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--png", help="write a bar chart here (needs matplotlib: pip install -e .[plot])")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = WorkloadSpec(sessions=args.sessions, turns=args.turns, think_s=args.think_s,
                        session_rate=args.session_rate, seed=args.seed)
    turns = multi_turn(spec)
    working = working_set_pages(turns, args.block_size)
    print(f"{len(turns)} requests, {args.sessions} sessions x {args.turns} turns; working set {working} pages = "
          f"{working / args.device_pages:.1f}x the device pool of {args.device_pages}; DRAM {args.dram_pages}, "
          f"disk {args.disk_pages} pages", file=sys.stderr)
    if working < 10 * args.device_pages:
        print("warning: the working set is under 10x the device pool", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench_kv_tiers_") as tmp:
        results = [replay("tiers off", turns, args, 0, 0, Path(tmp)),
                   replay("DRAM", turns, args, args.dram_pages, 0, Path(tmp)),
                   replay("DRAM+disk", turns, args, args.dram_pages, args.disk_pages, Path(tmp)),
                   ideal(turns, args.block_size)]
    best = results[-1].hit_rate
    print(f"\n{'configuration':<18} {'hit rate':>8} {'/ideal':>7} {'device':>8} {'dram':>8} {'disk':>8} "
          f"{'computed':>9} {'wrong':>5} {'s':>6}")
    for r in results:
        print(f"{r.name:<18} {r.hit_rate:>8.3f} {r.hit_rate / best:>7.3f} {r.hit_tokens['device']:>8} "
              f"{r.hit_tokens['dram']:>8} {r.hit_tokens['disk']:>8} {r.prompt_tokens - r.hits:>9} "
              f"{r.wrong_pages:>5} {r.seconds:>6.1f}")
    goal = results[2].hit_rate >= 0.9 * best
    print(f"\nDRAM+disk reaches {results[2].hit_rate / best:.1%} of the ideal hit rate (goal >= 90%): "
          f"{'met' if goal else 'missed'}; prefill tokens computed vs tiers off: "
          f"{(results[2].prompt_tokens - results[2].hits) / (results[0].prompt_tokens - results[0].hits):.2f}x")
    capacity = args.device_pages + args.dram_pages
    bound = {p: policy_replay(turns, args.block_size, capacity, p) for p in ("lru", "belady")}
    print(f"eviction policy headroom, one cache of device + DRAM = {capacity} pages: hit rate with LRU "
          f"{bound['lru']:.3f}, with Belady's MIN {bound['belady']:.3f} (offline, farthest next use first)")
    engine = []
    if args.engine:
        with tempfile.TemporaryDirectory(prefix="bench_kv_tiers_engine_") as tmp:
            engine = engine_bench(args, Path(tmp))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "working_set_pages": working,
                                               "policy_bound": bound, "results": [
            {"name": r.name, "hit_rate": r.hit_rate, "hit_tokens": r.hit_tokens, "prompt_tokens": r.prompt_tokens,
             "wrong_pages": r.wrong_pages, "seconds": r.seconds, "tiers": r.tiers} for r in results], "engine": [
            {"name": r.name, "hit_rate": r.hit_rate, "hit_tokens": r.hit_tokens, "prompt_tokens": r.prompt_tokens,
             "generated": r.generated, "ttft_p50_s": r.ttft(0.5), "ttft_p99_s": r.ttft(0.99),
             "tokens_per_s": r.throughput, "seconds": r.seconds, "working_set_pages": len(r.pages),
             "tiers": r.tiers} for r in engine]}, indent=1, default=str))
    if args.png:
        plot(results, args.png)
    same = all(r.outputs == engine[0].outputs for r in engine)
    return 0 if all(r.wrong_pages == 0 for r in results) and same else 1


def plot(results: list[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    bottom = [0.0] * len(results)
    for source in ("device", "dram", "disk"):
        share = [r.hit_tokens[source] / max(r.prompt_tokens, 1) for r in results]
        ax.bar([r.name for r in results], share, bottom=bottom, label=source)
        bottom = [b + s for b, s in zip(bottom, share)]
    ax.set_ylabel("prompt tokens served from a cache")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
