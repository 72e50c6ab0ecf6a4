"""Goodput of one machine's ranks split into a prefill and a decode instance, at an arrival rate.

The CPU path of the planner (hardware=cpu): P prefill and D decode ranks share `hardware.shared_cores`
cores, so a rank computes at cores / (busy ranks) of its measured rate. Queueing is arithmetic:
- prefill: one prompt per rank per step (DP attention), service time t_p = one prefill step of a mean
  prompt; utilisation rho = rate * t_p / P; TTFT = t_p + the M/D/1 wait rho * t_p / (2 (1 - rho)); past
  rho = 0.95 the wait there (9.5 t_p) plus half the backlog that builds while the `requests` arrive;
- decode: Little's law, sequences per rank n = rate * output_len * TPOT / D, with TPOT = one decode step of
  n sequences, solved by fixed-point iteration;
- goodput, as perf/bench_serving.py measures it: requests / (arrival span + the last request's latency) when
  the mean TTFT and TPOT meet their targets, else 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from moe_pd.config.planner import PlannerConfig
from moe_pd.planner.costs import prefill_context
from moe_pd.planner.phases import decode_step, prefill_step
from moe_pd.planner.plan import costs_of


@dataclass
class SplitPrediction:
    goodput: float
    ttft_s: float
    tpot_s: float
    prefill_utilisation: float
    decode_batch: float


def predict_split(cfg: PlannerConfig, prefill_ranks: int, decode_ranks: int, rate: float, requests: int,
                  max_output: int) -> SplitPrediction:
    experts = cfg.model.n_routed_experts  # each instance adds the slots that make its ranks divide them
    cfg = replace(cfg, prefill=replace(cfg.prefill, ep=prefill_ranks, num_redundant_experts=-experts % prefill_ranks),
                  decode=replace(cfg.decode, ep=decode_ranks, num_redundant_experts=-experts % decode_ranks))
    costs, precision = costs_of(cfg)
    w, hw = cfg.workload, cfg.hardware
    new = w.input_len * (1 - w.cache_hit_rate)
    kv_len = w.kv_len or w.input_len + w.output_len / 2
    cores = hw.shared_cores or float("inf")
    rho, batch, share = 0.0, 1.0, 1.0
    for _ in range(100):
        scaled = replace(cfg.hardware, flops_bf16=hw.flops_bf16 * share, hbm_bw=hw.hbm_bw * share,
                         op_overhead_us=hw.op_overhead_us / share, step_overhead_ms=hw.step_overhead_ms / share,
                         comm_latency_us=hw.comm_latency_us / share,
                         comm_latency_per_peer_us=hw.comm_latency_per_peer_us / share)
        step, kv_s = prefill_step(costs, scaled, cfg.prefill, precision, new, prefill_context(w.input_len, 0),
                                  1, w.input_len, cfg.decode.kv_bytes)
        t_p = step.total + kv_s
        rho = rate * t_p / prefill_ranks
        tpot = decode_step(costs, scaled, cfg.decode, precision, batch, kv_len, 0).total
        batch = 0.5 * batch + 0.5 * max(rate * w.output_len * tpot / decode_ranks, 1.0)
        busy = decode_ranks * min(1.0, rate * w.output_len * tpot / decode_ranks) + prefill_ranks * min(rho, 1.0)
        share = 0.5 * share + 0.5 * min(1.0, cores / max(busy, 1e-9))
    span = requests / rate
    wait = rho * t_p / (2 * (1 - rho)) if rho < 0.95 else (rho - 1 + 0.05) * span / 2 + 9.5 * t_p
    ttft = t_p + wait
    met = (w.ttft_slo_s is None or ttft <= w.ttft_slo_s) and (w.tpot_slo_ms is None or 1e3 * tpot <= w.tpot_slo_ms)
    goodput = requests / (span + ttft + max_output * tpot) if met else 0.0
    return SplitPrediction(goodput, ttft, tpot, rho, batch)
