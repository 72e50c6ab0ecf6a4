"""Which prefill:decode split of a machine's ranks serves the most? Measured, and predicted by the planner.

    python perf/bench_pd_split.py                        # 6 ranks: 1+5, 2+4, 3+3, 4+2 (tiny model, CPU)
    python perf/bench_pd_split.py --rates 8,16 --requests 48 --splits 2+4,4+2

For each split it starts a PD cluster on this machine (launch/local.sh, as perf/bench_serving.py does) and
sends bench_serving's open-loop Poisson workload at each rate (same seed, so every split sees the same
requests), recording goodput: requests per second that met both SLOs. The planner (`hardware=cpu
model=tiny`, conf/hardware/cpu.yaml from perf/calibrate_cpu.py) predicts the same figure for every split
and rate from its per-layer costs. The verdict: the planner's best split (most predicted goodput summed over
the rates) is the measured best, or within 5% of its measured goodput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

from bench_serving import drive, start_cluster, summarise, workload

from moe_pd.planner.calibrate import load
from moe_pd.planner.split import predict_split

SLOTS = 16  # the tiny model's routed experts


def measure(split: tuple[int, int], args, run_dir: Path) -> dict[float, dict]:
    span = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    # Each instance gets the redundant expert slots that make its ranks divide the tiny model's 16 experts.
    slots = [f"{role}:parallel.num_redundant_experts={-SLOTS % ranks}"
             for role, ranks in zip(("prefill", "decode"), split)]
    cluster = start_cluster("pd", split, ["runtime.log_level=WARNING", *slots], run_dir / f"{split[0]}+{split[1]}")
    rows = {}
    try:
        cluster.wait()
        asyncio.run(drive(cluster.url, workload(4, 100.0, span(args.input_len), span(args.output_len), 320, 999)))
        for rate in args.rates:
            requests = workload(args.requests, rate, span(args.input_len), span(args.output_len), 320, args.seed)
            results, elapsed = asyncio.run(drive(cluster.url, requests))
            rows[rate] = summarise(results, elapsed, args.ttft_slo, args.tpot_slo)
            r = rows[rate]
            print(f"{split[0]}+{split[1]} rate {rate:g}/s: goodput {r['goodput']:.2f}/s, "
                  f"TTFT p50 {r['ttft_p50']:.3f} s, TPOT p50 {1000 * r['tpot_p50']:.1f} ms, {r['failed']} failed",
                  file=sys.stderr, flush=True)
    finally:
        cluster.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--splits", default="1+5,2+4,3+3,4+2", help="prefill+decode ranks, comma-separated")
    parser.add_argument("--rates", default="4,8,16", help="arrival rates, requests/s")
    parser.add_argument("--requests", type=int, default=32, help="requests per rate")
    parser.add_argument("--input-len", default="64,512", help="prompt length range (tokens)")
    parser.add_argument("--output-len", default="16,64", help="output length range (tokens)")
    parser.add_argument("--ttft-slo", type=float, default=1.0, help="seconds")
    parser.add_argument("--tpot-slo", type=float, default=0.05, help="seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-measure", action="store_true", help="only print the planner's predictions")
    parser.add_argument("--json", help="also write measured and predicted figures to this file")
    parser.add_argument("overrides", nargs="*", help="more planner overrides (hardware=cpu model=tiny and the "
                                                     "cluster's precision and schedule are set)")
    args = parser.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    splits = [tuple(int(x) for x in s.split("+")) for s in args.splits.split(",")]
    lo_in, hi_in = (int(x) for x in args.input_len.split(","))
    lo_out, hi_out = (int(x) for x in args.output_len.split(","))
    # The cluster as launch/local.sh runs it: fp32 weights and cache, no MTP, no micro-batch overlap.
    cfg = load(["hardware=cpu", "model=tiny", "weights=fp32", "decode.kv_bytes=4", "decode.mtp_draft_tokens=0",
                "prefill.overlap=false", "decode.overlap=false", f"workload.input_len={(lo_in + hi_in) // 2}",
                f"workload.output_len={(lo_out + hi_out) // 2}", "workload.cache_hit_rate=0",
                f"workload.ttft_slo_s={args.ttft_slo}", f"workload.tpot_slo_ms={1000 * args.tpot_slo}",
                *args.overrides])
    predicted = {s: {r: predict_split(cfg, s[0], s[1], r, args.requests, hi_out) for r in args.rates} for s in splits}
    measured = {}
    if not args.no_measure:
        run_dir = Path(tempfile.mkdtemp(prefix="bench_pd_split_"))
        measured = {s: measure(s, args, run_dir) for s in splits}

    print(f"\nPoisson arrivals, {args.requests} requests per rate, input {args.input_len} tokens, output "
          f"{args.output_len} tokens; SLO: TTFT <= {args.ttft_slo} s, TPOT <= {1000 * args.tpot_slo:.0f} ms; "
          f"goodput in requests/s, measured / planned\n")
    print("| split | " + " | ".join(f"rate {r:g}: measured | planned" for r in args.rates) +
          " | planned TTFT (s) / TPOT (ms) at the top rate |")
    print("|---|" + "---:|---:|" * len(args.rates) + "---|")
    for s in splits:
        cells = []
        for r in args.rates:
            m = measured.get(s, {}).get(r)
            cells += [f"{m['goodput']:.2f}" if m else "-", f"{predicted[s][r].goodput:.2f}"]
        top = predicted[s][args.rates[-1]]
        print(f"| {s[0]}+{s[1]} | " + " | ".join(cells) + f" | {top.ttft_s:.3f} / {1000 * top.tpot_s:.1f} |")
    plan_total = {s: sum(p.goodput for p in predicted[s].values()) for s in splits}
    best_plan = max(splits, key=plan_total.get)
    print(f"\nplanner's best split: {best_plan[0]}+{best_plan[1]}")
    ok = True
    if measured:
        meas_total = {s: sum(m["goodput"] for m in measured[s].values()) for s in splits}
        best_meas = max(splits, key=meas_total.get)
        ratio = meas_total[best_plan] / meas_total[best_meas]
        ok = ratio >= 0.95
        print(f"measured best split: {best_meas[0]}+{best_meas[1]}; the planner's pick has {ratio:.3f} of its "
              f"goodput (summed over rates): {'PASS' if ok else 'FAIL'} (>= 0.95)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            f"{s[0]}+{s[1]}": {str(r): {"measured": measured.get(s, {}).get(r), "planned": vars(predicted[s][r])}
                               for r in args.rates} for s in splits}, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
