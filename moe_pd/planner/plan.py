"""From a PlannerConfig to a plan: each phase's operating point, what bounds it, and the node counts.

Prefill: a device computes up to `prefill.batch_tokens` tokens a step, fewer when the TTFT target needs
shorter steps; its input throughput counts cache hits (they cost no compute but are input, as DeepSeek
counts it). Decode: the batch per device is the largest that the KV cache holds, `decode.max_batch`
allows and the TPOT target accepts; output throughput is batch * MTP acceptance length / step time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moe_pd.config.errors import ConfigError
from moe_pd.config.hf import fp8_block_size, model_config_from_hf, mtp_layers, read_config_json
from moe_pd.config.model import ModelConfig
from moe_pd.config.planner import PlannerConfig
from moe_pd.planner.costs import LayerCosts, prefill_context
from moe_pd.planner.phases import decode_step, expert_slots, prefill_step
from moe_pd.planner.roofline import StepTime

KV_CAPACITY, KV_TRANSFER, MAX_BATCH, TPOT_SLO = "KV capacity", "KV transfer", "max_batch", "TPOT SLO"
_BYTES = {"fp8": 1.0, "bf16": 2.0, "fp32": 4.0}


class PlanError(ValueError):
    """The workload cannot be served as configured (the message says which limit)."""


@dataclass
class PrefillPlan:
    tokens_per_step: int
    step: StepTime
    kv_transfer_s: float
    input_tok_s_per_device: float
    ttft_s: float
    bound: str


@dataclass
class DecodePlan:
    batch: int
    batch_limit: str
    kv_capacity_batch: int
    weights_gb: float
    step: StepTime
    tpot_ms: float
    output_tok_s_per_device: float
    bound: str


@dataclass
class Plan:
    model: str
    precision: str
    prefill: PrefillPlan
    decode: DecodePlan
    prefill_input_tok_s_per_node: float
    decode_output_tok_s_per_node: float
    decode_to_prefill_ratio: float
    """Decode nodes per prefill node when both phases run the same requests at their operating points."""
    prefill_nodes: int
    decode_nodes: int
    extra: dict = field(default_factory=dict)


def resolve_model(cfg: PlannerConfig) -> tuple[ModelConfig, str, int]:
    """(architecture, GEMM precision, MTP layers), from model.path's config.json when set, via the same
    reader as the loader (quantization_config gives the FP8 blocks, num_nextn_predict_layers the MTP)."""
    if cfg.model.path:
        hf = read_config_json(cfg.model.path)
        model, fp8, mtp = model_config_from_hf(hf, cfg.model.path), fp8_block_size(hf) is not None, mtp_layers(hf)
    else:
        v3 = cfg.model.architecture == "DeepseekV3ForCausalLM"
        model, fp8, mtp = cfg.model, v3, int(v3)
    precision = cfg.weights if cfg.weights != "auto" else ("fp8" if fp8 else "bf16")
    return model, precision, mtp


def costs_of(cfg: PlannerConfig) -> tuple[LayerCosts, str]:
    model, precision, mtp = resolve_model(cfg)
    for phase in (cfg.prefill, cfg.decode):
        name = "prefill" if phase is cfg.prefill else "decode"
        if model.n_routed_experts + phase.num_redundant_experts < phase.ep:
            raise ConfigError(f"{name}.ep={phase.ep}: more devices than expert slots "
                              f"({model.n_routed_experts} + {phase.num_redundant_experts} redundant)")
    return LayerCosts(model, _BYTES[precision], mtp), precision


def plan_prefill(cfg: PlannerConfig, costs: LayerCosts, precision: str, tokens: int | None = None) -> PrefillPlan:
    w, hw = cfg.workload, cfg.hardware
    cached = w.input_len * w.cache_hit_rate
    new = w.input_len - cached
    context = prefill_context(w.input_len, cached)
    request_kv = w.input_len * costs.kv_bytes_per_token(cfg.decode.kv_bytes) / (hw.rdma_bw * hw.eff_net * 1e9)

    def at(t: float) -> PrefillPlan:
        step, kv_s = prefill_step(costs, hw, cfg.prefill, precision, t, context, t / new, t / new * w.input_len,
                                  cfg.decode.kv_bytes)
        slack = max(0.0, step.busy - step.comm)
        seconds = step.total + max(0.0, kv_s - slack)
        bound = KV_TRANSFER if kv_s > slack and kv_s >= 0.5 * seconds else step.bound
        # A request waits on average half a running step, then its own steps (chunks of `t` tokens).
        ttft = seconds * (0.5 + math.ceil(new / t)) + request_kv
        return PrefillPlan(int(t), step, kv_s, t / (1 - w.cache_hit_rate) / seconds, ttft, bound)

    if tokens is not None:
        return at(tokens)
    best = at(cfg.prefill.batch_tokens)
    if w.ttft_slo_s is None or best.ttft_s <= w.ttft_slo_s:
        return best
    lo, hi = 1, cfg.prefill.batch_tokens
    if at(lo).ttft_s > w.ttft_slo_s:
        raise PlanError(f"workload.ttft_slo_s={w.ttft_slo_s}: even one token per prefill step takes "
                        f"{at(lo).ttft_s:.3f} s")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if at(mid).ttft_s <= w.ttft_slo_s else (lo, mid - 1)
    return at(lo)


def plan_decode(cfg: PlannerConfig, costs: LayerCosts, precision: str, batch: int | None = None) -> DecodePlan:
    w, hw, d = cfg.workload, cfg.hardware, cfg.decode
    kv_len = w.kv_len or w.input_len + w.output_len / 2
    drafts = (costs.mtp_layers if d.mtp_draft_tokens is None else d.mtp_draft_tokens) if costs.mtp_layers else 0
    accept = d.mtp_accept_len if drafts else 1.0
    weights = costs.weight_bytes_per_device(expert_slots(costs, d.ep, d.num_redundant_experts))
    free = hw.hbm_gb * 1e9 - hw.reserved_gb * 1e9 - weights
    kv_batch = int(free // (kv_len * costs.kv_bytes_per_token(d.kv_bytes))) if free > 0 else 0
    if kv_batch < 1:
        raise PlanError(f"decode: {weights / 1e9:.1f} GB of weights per device leave no room for one sequence "
                        f"of {kv_len:.0f} tokens; raise decode.ep or lower hardware.reserved_gb")

    def at(b: int, limit: str) -> DecodePlan:
        step = decode_step(costs, hw, d, precision, b, kv_len, drafts)
        bound = KV_CAPACITY if limit == KV_CAPACITY else step.bound
        return DecodePlan(b, limit, kv_batch, weights / 1e9, step, 1e3 * step.total / accept,
                          b * accept / step.total, bound)

    if batch is not None:
        return at(batch, "given")
    top, limit = (d.max_batch, MAX_BATCH) if d.max_batch <= kv_batch else (kv_batch, KV_CAPACITY)
    best = at(top, limit)
    if w.tpot_slo_ms is None or best.tpot_ms <= w.tpot_slo_ms:
        return best
    lo, hi = 1, top
    if at(1, TPOT_SLO).tpot_ms > w.tpot_slo_ms:
        raise PlanError(f"workload.tpot_slo_ms={w.tpot_slo_ms}: even one sequence per device takes "
                        f"{at(1, TPOT_SLO).tpot_ms:.1f} ms per token")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if at(mid, TPOT_SLO).tpot_ms <= w.tpot_slo_ms else (lo, mid - 1)
    return at(lo, TPOT_SLO)


def plan(cfg: PlannerConfig) -> Plan:
    costs, precision = costs_of(cfg)
    w, gpn = cfg.workload, cfg.hardware.gpus_per_node
    pre, dec = plan_prefill(cfg, costs, precision), plan_decode(cfg, costs, precision)
    pre_node, dec_node = pre.input_tok_s_per_device * gpn, dec.output_tok_s_per_device * gpn
    ratio = (w.output_len / dec_node) / (w.input_len / pre_node)
    unit_p, unit_d = math.ceil(cfg.prefill.ep / gpn), math.ceil(cfg.decode.ep / gpn)
    if w.request_rate is None:
        nodes_p, nodes_d = unit_p, unit_d
    else:
        nodes_p = unit_p * math.ceil(w.request_rate * w.input_len / pre_node / unit_p)
        nodes_d = unit_d * math.ceil(w.request_rate * w.output_len / dec_node / unit_d)
    return Plan(f"{costs.cfg.architecture} ({costs.cfg.path or 'preset'})", precision, pre, dec, pre_node,
                dec_node, ratio, nodes_p, nodes_d)
