"""Calibration on DeepSeek's day-6 operating point, validation on SGLang's 96 x H100 figures.

    python -m moe_pd.planner.calibrate            # fit, then the validation table (markdown)

Sources (public):
- DeepSeek, open-infra-index, 202502OpenSourceWeek/day_6_one_more_thing_deepseekV3R1_inference_system_overview.md
  ("DeepSeek-V3/R1 Inference System Overview", 2025-03-01): H800; prefill EP32 units of 4 nodes, decode
  EP144 units of 18 nodes, 32 redundant experts; 608B input tokens a day of which 342B (56.3%) hit the KV
  cache, 168B output tokens, 20-22 output tokens/s per user, average KV length 4,989 per output token;
  ~73.7k input tokens/s per node in prefill (cache hits included), ~14.8k output tokens/s per node in decode.
- The SGLang Team, LMSYS blog, 2025-05-05, "Deploying DeepSeek with PD Disaggregation and Large-scale Expert
  Parallelism on 96 H100 GPUs": prefill on 4 nodes (EP32), 57,674 / 54,543 / 50,302 input tokens/s per
  node for 1K / 2K / 4K prompts; decode on 9 nodes (EP72), batch 256 per GPU, KV length 2,000: 22,282
  output tokens/s per node.

The day-6 traffic as planner inputs: input/output = 608/168 = 3.62 tokens per request, and a decode step
reads on average input + output/2 = 4,989 tokens, so input 4,383 and output 1,211 for a mean request;
TPOT target 1000/21 ms (the mean of 20-22 tokens/s).

Fitted (two numbers, two observations): eff_gemm from the prefill figure, eff_net from the decode one,
by alternating bisection. eff_attn and eff_hbm are not fitted (FlashMLA's published H800 figures).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hydra import compose, initialize_config_module

from moe_pd.config.planner import PlannerConfig
from moe_pd.config.store import register_configs, to_config
from moe_pd.planner.plan import costs_of, plan_decode, plan_prefill

DAY6_WORKLOAD = ["workload.input_len=4383", "workload.output_len=1211", "workload.cache_hit_rate=0.563",
                 "workload.kv_len=4989", "workload.tpot_slo_ms=47.62"]
DAY6 = ["hardware=h800", "prefill.ep=32", "decode.ep=144", *DAY6_WORKLOAD]
DAY6_PREFILL, DAY6_DECODE = 73.7e3, 14.8e3


@dataclass(frozen=True)
class Case:
    name: str
    overrides: tuple[str, ...]
    phase: str
    """'prefill' (input tok/s per node) or 'decode' (output tok/s per node)."""
    published: float


SGLANG = (
    *(Case(f"SGLang prefill, {n // 1024}K prompts, 4 x 8 H100 (EP32)", (
        "hardware=h100", "prefill.ep=32", f"workload.input_len={n}", "workload.cache_hit_rate=0"), "prefill", pub)
      for n, pub in ((1024, 57674.0), (2048, 54543.0), (4096, 50302.0))),
    Case("SGLang decode, batch 256, KV 2,000, 9 x 8 H100 (EP72)", (
        "hardware=h100", "decode.ep=72", "decode.max_batch=256", "decode.mtp_draft_tokens=0",
        "workload.input_len=2000", "workload.kv_len=2000", "workload.cache_hit_rate=0"), "decode", 22282.0),
)
DAY6_CASES = (Case("DeepSeek day-6 prefill, 4 x 8 H800 (EP32)", tuple(DAY6), "prefill", DAY6_PREFILL),
              Case("DeepSeek day-6 decode, 18 x 8 H800 (EP144)", tuple(DAY6), "decode", DAY6_DECODE))


def load(overrides: list[str] | tuple[str, ...]) -> PlannerConfig:
    """The planner's config as `python -m moe_pd.planner <overrides>` composes it."""
    register_configs()
    with initialize_config_module("moe_pd.conf", version_base=None):
        return to_config(compose("planner", overrides=list(overrides)))


def predict(cfg: PlannerConfig, phase: str) -> float:
    """Per-node throughput of one phase: input tok/s (prefill) or output tok/s (decode)."""
    costs, precision = costs_of(cfg)
    gpn = cfg.hardware.gpus_per_node
    if phase == "prefill":
        return plan_prefill(cfg, costs, precision).input_tok_s_per_device * gpn
    return plan_decode(cfg, costs, precision).output_tok_s_per_device * gpn


def _bisect(f, target: float, lo: float = 0.02, hi: float = 1.0) -> float:
    """x in [lo, hi] with f(x) = target for increasing f (clamped at the ends)."""
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2


def fit(cfg: PlannerConfig | None = None) -> tuple[float, float]:
    """(eff_gemm, eff_net) that reproduce the day-6 prefill and decode figures."""
    cfg = cfg or load(DAY6)
    gemm, net = cfg.hardware.eff_gemm, cfg.hardware.eff_net
    for _ in range(5):
        with_hw = lambda **kw: replace(cfg, hardware=replace(cfg.hardware, **kw))  # noqa: E731
        gemm = _bisect(lambda g: predict(with_hw(eff_gemm=g, eff_net=net), "prefill"), DAY6_PREFILL)
        net = _bisect(lambda n: predict(with_hw(eff_gemm=gemm, eff_net=n), "decode"), DAY6_DECODE)
    return gemm, net


def table(cases=DAY6_CASES + SGLANG) -> list[tuple[Case, float, float]]:
    """(case, predicted, relative error) with the presets as they are (no refitting)."""
    rows = []
    for case in cases:
        predicted = predict(load(case.overrides), case.phase)
        rows.append((case, predicted, predicted / case.published - 1))
    return rows


def main() -> None:
    gemm, net = fit()
    print(f"fitted on day-6: eff_gemm {gemm:.4f}, eff_net {net:.4f} (conf/hardware/h800.yaml keeps them)\n")
    print("| case | published | predicted | error |\n|---|---:|---:|---:|")
    for case, predicted, err in table():
        print(f"| {case.name} | {case.published:,.0f} | {predicted:,.0f} | {100 * err:+.1f}% |")


if __name__ == "__main__":
    main()
