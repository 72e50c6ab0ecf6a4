"""Serving benchmark: open-loop Poisson arrivals against a PD cluster and a colocated one, in one run.

    python perf/bench_serving.py                       # starts both clusters here (launch/local.sh), tiny model
    python perf/bench_serving.py --rates 1,2,4 --requests 48 --ttft-slo 2 --tpot-slo 0.2
    python perf/bench_serving.py --pd-url http://p:8000 --colocated-url http://c:8000   # running clusters

For each mode and arrival rate it sends --requests streaming requests whose arrival times are a Poisson
process (exponential gaps, fixed seed: both modes see the same workload), and reports TTFT and TPOT (p50,
p99), output-token throughput, and goodput: requests per second that met both SLOs (TTFT <= --ttft-slo,
TPOT <= --tpot-slo), as DistServe defines it. The last table is the goodput of PD over colocated per rate.
Both clusters get the same number of ranks (prefill + decode = colocated), so the ratio compares the same
hardware split two ways. Prompts are random token ids (lengths in --input-len), outputs run to exactly
--output-len tokens (ignore_eos), greedy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from moe_pd.serve.local_cluster import LocalCluster


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    tpot: float = 0.0
    tokens: int = 0
    error: str = ""


def workload(n: int, rate: float, input_len: tuple[int, int], output_len: tuple[int, int], vocab: int,
             seed: int) -> list[tuple[float, list[int], int]]:
    """(arrival offset in s, prompt ids, output tokens) per request."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(*input_len))]
        out.append((t, prompt, rng.randint(*output_len)))
    return out


async def one(session: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int) -> Result:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "return_token_ids": True}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    try:
        async with session.post(url + "/v1/completions", json=body) as r:
            if r.status != 200:
                return Result(False, error=f"HTTP {r.status}: {(await r.text())[:200]}")
            async for line in r.content:
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return Result(False, error=event["error"]["message"])
                n = len(event["choices"][0].get("token_ids", []))
                if n:
                    last = time.perf_counter()
                    first = first or last
                    tokens += n
    except aiohttp.ClientError as exc:
        return Result(False, error=str(exc))
    if first is None:
        return Result(False, error="no tokens")
    return Result(True, first - start, (last - first) / max(tokens - 1, 1), tokens)


async def drive(url: str, requests: list[tuple[float, list[int], int]]) -> tuple[list[Result], float]:
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()

        async def at(offset, prompt, n):
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            return await one(session, url, prompt, n)

        results = await asyncio.gather(*(at(*r) for r in requests))
        return list(results), time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarise(results: list[Result], elapsed: float, ttft_slo: float, tpot_slo: float) -> dict:
    ok = [r for r in results if r.ok]
    good = [r for r in ok if r.ttft <= ttft_slo and r.tpot <= tpot_slo]
    return {"ok": len(ok), "failed": len(results) - len(ok),
            "ttft_p50": pct([r.ttft for r in ok], 50), "ttft_p99": pct([r.ttft for r in ok], 99),
            "tpot_p50": pct([r.tpot for r in ok], 50), "tpot_p99": pct([r.tpot for r in ok], 99),
            "tok_s": sum(r.tokens for r in ok) / elapsed, "goodput": len(good) / elapsed,
            "errors": sorted({r.error for r in results if not r.ok})[:3]}


# clusters ------------------------------------------------------------------------------------------------
def start_cluster(mode: str, ranks: tuple[int, int], overrides: list[str], run_dir: Path) -> LocalCluster:
    """launch/local.sh for `mode`: PD with `ranks` (prefill, decode), or colocated with their sum."""
    prefill, decode = ranks
    extra = []
    slots = 16  # the tiny model's routed experts
    if mode == "colocated" and slots % (prefill + decode):
        extra = [f"parallel.num_redundant_experts={-slots % (prefill + decode)}"]  # so the ranks divide the slots
    return LocalCluster(run_dir / mode, [*overrides, *extra], mode, env={
        "PREFILL_RANKS": str(prefill), "DECODE_RANKS": str(decode), "COLOCATED_RANKS": str(prefill + decode)})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="1,2,4", help="arrival rates, requests/s")
    parser.add_argument("--requests", type=int, default=32, help="requests per rate")
    parser.add_argument("--input-len", default="64,512", help="prompt length range (tokens)")
    parser.add_argument("--output-len", default="16,64", help="output length range (tokens)")
    parser.add_argument("--ttft-slo", type=float, default=2.0, help="seconds")
    parser.add_argument("--tpot-slo", type=float, default=0.2, help="seconds")
    parser.add_argument("--ranks", default="2,4", help="prefill,decode ranks of the local PD cluster; the "
                                                      "colocated one gets their sum")
    parser.add_argument("--vocab", type=int, default=320, help="prompt ids are drawn from [0, vocab)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pd-url", help="a running PD cluster's router (else one is started here)")
    parser.add_argument("--colocated-url", help="a running colocated cluster's router (else one is started here)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the clusters started here")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    span = lambda s: tuple(int(x) for x in s.split(","))
    ranks = span(args.ranks)
    overrides = ["runtime.log_level=WARNING", *args.overrides]
    run_dir = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    table: dict[str, dict[float, dict]] = {}
    for mode, url in (("pd", args.pd_url), ("colocated", args.colocated_url)):
        cluster = None
        if url is None:
            cluster = start_cluster(mode, ranks, overrides, run_dir)
            url = cluster.url
        try:
            if cluster:
                cluster.wait()
            warm = workload(4, 100.0, span(args.input_len), span(args.output_len), args.vocab, args.seed + 999)
            asyncio.run(drive(url, warm))  # first-step costs out of the measurement
            for rate in rates:
                requests = workload(args.requests, rate, span(args.input_len), span(args.output_len), args.vocab,
                                    args.seed)
                results, elapsed = asyncio.run(drive(url, requests))
                table.setdefault(mode, {})[rate] = row = summarise(results, elapsed, args.ttft_slo, args.tpot_slo)
                print(f"{mode:9s} rate {rate:5.2f}/s: {row['ok']} ok, {row['failed']} failed, "
                      f"TTFT p50 {row['ttft_p50']:.3f} s, TPOT p50 {1000 * row['tpot_p50']:.1f} ms, "
                      f"goodput {row['goodput']:.2f}/s {row['errors'] or ''}", file=sys.stderr, flush=True)
        finally:
            if cluster:
                cluster.stop()

    print(f"\nPoisson arrivals, {args.requests} requests per rate, input {args.input_len} tokens, output "
          f"{args.output_len} tokens; SLO: TTFT <= {args.ttft_slo} s, TPOT <= {1000 * args.tpot_slo:.0f} ms; "
          f"PD {ranks[0]}+{ranks[1]} ranks, colocated {sum(ranks)} ranks\n")
    print("| mode | rate (req/s) | ok | TTFT p50 (s) | TTFT p99 (s) | TPOT p50 (ms) | TPOT p99 (ms) | tok/s "
          "| goodput (req/s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, rows in table.items():
        for rate, r in rows.items():
            print(f"| {mode} | {rate:g} | {r['ok']}/{r['ok'] + r['failed']} | {r['ttft_p50']:.3f} | "
                  f"{r['ttft_p99']:.3f} | {1000 * r['tpot_p50']:.1f} | {1000 * r['tpot_p99']:.1f} | "
                  f"{r['tok_s']:.1f} | {r['goodput']:.2f} |")
    print("\n| rate (req/s) | goodput PD / colocated | tok/s PD / colocated |\n|---|---|---|")
    ratios = []
    for rate in rates:
        pd, co = table["pd"][rate], table["colocated"][rate]
        ratio = pd["goodput"] / co["goodput"] if co["goodput"] else float("inf") if pd["goodput"] else float("nan")
        ratios.append(ratio)
        print(f"| {rate:g} | {ratio:.2f}x | {pd['tok_s'] / max(co['tok_s'], 1e-9):.2f}x |")
    finite = [r for r in ratios if 0 < r < float("inf")]
    if finite:
        print(f"\ngeometric mean goodput ratio PD/colocated: {statistics.geometric_mean(finite):.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({m: {str(k): v for k, v in rows.items()} for m, rows in table.items()},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
