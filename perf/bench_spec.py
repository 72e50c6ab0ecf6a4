"""MTP speculative decoding on the trained tiny checkpoint: decode tokens/s for K = 0, 1, 2, 3 in one run.

    python perf/bench_spec.py [--batch 1] [--prompts 8] [--new-tokens 48] [--repeats 5] [--threads 1] [--png FILE]

Prompts are the first halves of held-out documents of the training corpus (stream seed 3, as the
checkpoint's own acceptance figure in training.json), generated greedily to a fixed length (ignore_eos).
The prompts run `--batch` at a time through an OfflineEngine per K; the Ks take turns on each batch (their
order rotating per repeat), so every K sees the same machine load, and decode tokens/s is the sum over every
batch and repeat of the tokens emitted in decode steps over those steps' time (engine stats). Reports per K:
decode tokens/s, its ratio to K = 0 measured in the same run, the mean acceptance length (tokens a
verification emits: accepted drafts + 1), the acceptance rate per draft position, and whether the greedy
tokens equal K = 0's. The output ends with the best K's lines.
"""

from __future__ import annotations

import argparse
import time

import torch

from moe_pd.assets import TINY_DSV3
from moe_pd.config.hf import resolve_model_config
from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.config.model import ModelConfig
from moe_pd.config.sampling import SamplingConfig
from moe_pd.engine.offline import OfflineEngine
from moe_pd.engine.spec.engine_step import SpecStats
from moe_pd.engine.tokenizer import load_tokenizer
from moe_pd.model.loader import build_model
from moe_pd.training.corpus import document


def held_out_prompts(tokenizer, count: int) -> list[list[int]]:
    prompts = []
    for i in range(count):
        ids = tokenizer.encode(document(3, i))
        prompts.append(ids[: max(2, len(ids) // 2)])
    return prompts


def run(model, prompts: list[list[int]], k: int, new_tokens: int):
    """One batch of prompts at K: (decode tokens, decode seconds, outputs, acceptance)."""
    engine = OfflineEngine(model, KVCacheConfig(block_size=16, num_blocks=512), max_batch_size=len(prompts),
                           num_draft_tokens=k)
    out = engine.generate(prompts, SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True))
    s = engine.stats
    return s.decode_tokens, s.decode_s, [c.output_ids for c in out], s.spec


def measure(model, prompts: list[list[int]], ks: list[int], batch: int, new_tokens: int, repeats: int):
    """Per K: decode tokens/s over every batch of every repeat, outputs and acceptance (of the last repeat).
    The Ks take turns on each batch (their order rotating per repeat), so they see the same machine load."""
    tokens = {k: 0 for k in ks}
    seconds = {k: 0.0 for k in ks}
    outputs: dict[int, list] = {}
    stats: dict[int, SpecStats] = {}
    for r in range(repeats):
        outputs = {k: [] for k in ks}
        stats = {k: SpecStats(k) for k in ks}
        for start in range(0, len(prompts), batch):
            for k in ks[r % len(ks):] + ks[: r % len(ks)]:
                n, s, out, spec = run(model, prompts[start : start + batch], k, new_tokens)
                tokens[k], seconds[k] = tokens[k] + n, seconds[k] + s
                outputs[k] += out
                if k:
                    stats[k] = SpecStats.merged([stats[k], spec])
    return {k: tokens[k] / seconds[k] for k in ks}, outputs, stats


def plot(path: str, ks: list[int], rates: dict[int, float], lengths: dict[int, float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar([str(k) for k in ks], [rates[k] / rates[0] for k in ks], color="#4c72b0")
    for i, k in enumerate(ks):
        label = f"{rates[k] / rates[0]:.2f}x" + (f"\nlen {lengths[k]:.2f}" if k else "")
        ax.text(i, rates[k] / rates[0], label, ha="center", va="bottom", fontsize=8)
    ax.axhline(1.3, color="grey", ls="--", lw=0.8, label="goal 1.3x")
    ax.set_xlabel("draft tokens K")
    ax.set_ylabel("decode tokens/s vs K = 0")
    ax.set_ylim(0, max(rates[k] / rates[0] for k in ks) * 1.25)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ks", default="0,1,2,3")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--png", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    if ks[0] != 0:
        raise SystemExit("--ks must start with 0 (the baseline)")
    cfg = resolve_model_config(ModelConfig(path=str(TINY_DSV3)))
    model = build_model(cfg, mtp=True)
    prompts = held_out_prompts(load_tokenizer(cfg), args.prompts)
    print(f"{TINY_DSV3.name}: {cfg.num_hidden_layers} layers + 1 MTP, {len(prompts)} prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, batch {args.batch}, {args.new_tokens} new "
          f"tokens, greedy, {torch.get_num_threads()} thread(s), {args.repeats} repeats")
    run(model, prompts[:1], ks[-1], 4)  # warm-up
    t0 = time.perf_counter()
    rates, outputs, stats = measure(model, prompts, ks, args.batch, args.new_tokens, args.repeats)
    lengths = {k: stats[k].mean_acceptance_length for k in ks if k}
    print(f"{'K':>2} {'decode tok/s':>13} {'vs K=0':>7} {'accept len':>10}  acceptance per draft position  "
          f"tokens identical")
    for k in ks:
        accept = f"{lengths[k]:>10.3f}  [{', '.join(f'{r:.3f}' for r in stats[k].acceptance_rates)}]" if k else \
            f"{'-':>10}  {'-':<30}"
        print(f"{k:>2} {rates[k]:>13.1f} {rates[k] / rates[0]:>6.2f}x {accept:<42} {outputs[k] == outputs[0]}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    best = max((k for k in ks if k), key=lambda k: rates[k])
    if args.png:
        plot(args.png, ks, rates, lengths, f"MTP speculative decoding, tiny_dsv3 on CPU, batch {args.batch}")
    print(f"best K: {best}")
    print(f"mean acceptance length: {lengths[best]:.3f}")
    print(f"decode speedup: {rates[best] / rates[0]:.2f} x")
    print(f"tokens identical: {all(outputs[k] == outputs[0] for k in ks)}")


if __name__ == "__main__":
    main()
