"""The planner's output: a markdown table for people and one JSON object for programs."""

from __future__ import annotations

from moe_pd.config.planner import PlannerConfig
from moe_pd.planner.plan import Plan
from moe_pd.planner.roofline import StepTime


def _nodes(devices: int, per_node: int) -> str:
    n = -(-devices // per_node)
    return f"{n} node{'s' if n > 1 else ''}"


def _k(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.1f}"


def _breakdown(step: StepTime) -> str:
    parts = ", ".join(f"{name} {1e3 * s:.1f}" for name, s in step.parts.items())
    return (f"{parts}, all-to-all {1e3 * step.comm:.1f} ({1e3 * step.exposed_comm:.1f} exposed), "
            f"overhead {1e3 * step.overhead:.1f}")


def to_json(cfg: PlannerConfig, p: Plan) -> dict:
    """The fields the issue names first; the rest describe each phase's operating point."""
    return {
        "prefill_input_tok_s_per_node": round(p.prefill_input_tok_s_per_node, 1),
        "decode_output_tok_s_per_node": round(p.decode_output_tok_s_per_node, 1),
        "prefill_nodes": p.prefill_nodes,
        "decode_nodes": p.decode_nodes,
        "ttft_s": round(p.prefill.ttft_s, 4),
        "tpot_ms": round(p.decode.tpot_ms, 3),
        "prefill_bound": p.prefill.bound,
        "decode_bound": p.decode.bound,
        "decode_to_prefill_ratio": round(p.decode_to_prefill_ratio, 4),
        "prefill_tokens_per_step": p.prefill.tokens_per_step,
        "prefill_step_s": round(p.prefill.step.total, 6),
        "decode_batch": p.decode.batch,
        "decode_batch_limit": p.decode.batch_limit,
        "decode_kv_capacity_batch": p.decode.kv_capacity_batch,
        "decode_step_s": round(p.decode.step.total, 6),
        "decode_weights_gb": round(p.decode.weights_gb, 2),
        "hardware": cfg.hardware.name,
        "gpus_per_node": cfg.hardware.gpus_per_node,
        "precision": p.precision,
    }


def to_table(cfg: PlannerConfig, p: Plan) -> str:
    w, hw = cfg.workload, cfg.hardware
    kv_len = w.kv_len or w.input_len + w.output_len / 2
    slo = (f"TTFT <= {w.ttft_slo_s} s" if w.ttft_slo_s else "no TTFT target") + ", " + \
          (f"TPOT <= {w.tpot_slo_ms} ms" if w.tpot_slo_ms else "no TPOT target")
    pre, dec, gpn = p.prefill, p.decode, hw.gpus_per_node
    lines = [
        f"model {p.model}, {p.precision} GEMMs; hardware {hw.name}, {gpn} per node",
        f"workload: input {w.input_len} tokens ({100 * w.cache_hit_rate:.1f}% cached), output {w.output_len}, "
        f"decode KV length {kv_len:.0f}; {slo}",
        "",
        "| phase | unit | per device | step | per node | bound |",
        "|---|---|---|---|---|---|",
        f"| prefill | EP{cfg.prefill.ep} ({_nodes(cfg.prefill.ep, gpn)}) | {pre.tokens_per_step} tokens/step "
        f"| {pre.step.total:.3f} s | {_k(p.prefill_input_tok_s_per_node)} input tok/s | {pre.bound} |",
        f"| decode | EP{cfg.decode.ep} ({_nodes(cfg.decode.ep, gpn)}) | batch {dec.batch} (set by "
        f"{dec.batch_limit}; KV room for {dec.kv_capacity_batch}) | {1e3 * dec.step.total:.1f} ms "
        f"| {_k(p.decode_output_tok_s_per_node)} output tok/s | {dec.bound} |",
        "",
        f"prefill step (ms): {_breakdown(pre.step)}; KV transfer {1e3 * pre.kv_transfer_s:.1f}",
        f"decode step (ms): {_breakdown(dec.step)}; weights {dec.weights_gb:.1f} GB per device",
        f"latency: TTFT {pre.ttft_s:.3f} s, TPOT {dec.tpot_ms:.1f} ms",
        f"decode:prefill node ratio for this workload: {p.decode_to_prefill_ratio:.2f}",
    ]
    if w.request_rate is not None:
        lines.append(f"for {w.request_rate:g} requests/s: {p.prefill_nodes} prefill nodes, "
                     f"{p.decode_nodes} decode nodes (whole units)")
    else:
        lines.append(f"one unit each: {p.prefill_nodes} prefill nodes, {p.decode_nodes} decode nodes "
                     f"(set workload.request_rate to size for a load)")
    return "\n".join(lines)
