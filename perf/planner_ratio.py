"""The card's question: how many decode nodes per prefill node does DeepSeek-V3 need on H800, and why?

    python perf/planner_ratio.py [--png docs/planner_ratio.png] [planner overrides...]

Runs the planner (DeepSeek-V3, hardware=h800, day-6 prompt length 4,383 tokens and TPOT target 1000/21 ms,
prefill EP32 and decode EP144 units) at cache-hit rates 0, 25, 56.3 and 80% and output lengths 256, 1K
and 4K tokens; prints the decode:prefill node ratio with the bound of each phase as a markdown table and
plots it (needs matplotlib: pip install -e .[plot]).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_pd.planner.calibrate import load
from moe_pd.planner.plan import plan

HITS = (0.0, 0.25, 0.563, 0.8)
OUTPUTS = (256, 1024, 4096)
BASE = ["hardware=h800", "prefill.ep=32", "decode.ep=144", "workload.input_len=4383", "workload.tpot_slo_ms=47.62"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--png", help="write the figure here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = {}
    for out in OUTPUTS:
        for hit in HITS:
            cfg = load([*BASE, f"workload.output_len={out}", f"workload.cache_hit_rate={hit}", *args.overrides])
            rows[out, hit] = plan(cfg)
    print("decode:prefill node ratio, DeepSeek-V3 on H800 (prompt 4,383 tokens, TPOT <= 47.6 ms, EP32 / EP144)\n")
    print("| output tokens | " + " | ".join(f"{100 * h:g}% hits" for h in HITS) + " |")
    print("|---|" + "---:|" * len(HITS))
    for out in OUTPUTS:
        print(f"| {out} | " + " | ".join(f"{rows[out, h].decode_to_prefill_ratio:.2f}" for h in HITS) + " |")
    print("\n| output | hits | prefill input tok/s/node | bound | decode output tok/s/node | batch (limit) | bound |")
    print("|---|---|---:|---|---:|---|---|")
    for (out, hit), p in rows.items():
        print(f"| {out} | {100 * hit:g}% | {p.prefill_input_tok_s_per_node:,.0f} | {p.prefill.bound} | "
              f"{p.decode_output_tok_s_per_node:,.0f} | {p.decode.batch} ({p.decode.batch_limit}) | {p.decode.bound} |")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for out in OUTPUTS:
            ax.plot([100 * h for h in HITS], [rows[out, h].decode_to_prefill_ratio for h in HITS], marker="o",
                    label=f"output {out} tokens")
        ax.axhline(10, color="grey", ls="--", lw=1)
        ax.text(1, 10.3, "tenfold", color="grey")
        ax.axhline(18 / 4, color="grey", ls=":", lw=1)
        ax.text(1, 4.7, "DeepSeek's unit sizes, 18:4", color="grey")
        ax.axvline(56.3, color="grey", ls=":", lw=1)
        ax.set_xlabel("prefix-cache hit rate (% of input tokens)")
        ax.set_ylabel("decode nodes per prefill node")
        ax.set_yscale("log")
        day6 = plan(load([*BASE, "workload.output_len=1211", "workload.cache_hit_rate=0.563", *args.overrides]))
        ax.plot([56.3], [day6.decode_to_prefill_ratio], marker="*", ms=14, color="black", ls="none",
                label=f"day-6 traffic (output 1,211): {day6.decode_to_prefill_ratio:.2f}")
        ax.set_title("DeepSeek-V3 on H800: decode nodes per prefill node\n"
                     "(prompt 4,383 tokens, TPOT <= 47.6 ms, EP32 prefill / EP144 decode)", fontsize=10)
        ax.legend()
        fig.tight_layout()
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png, dpi=110)
        print(f"\nwrote {args.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
