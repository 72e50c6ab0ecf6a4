"""One step of each phase on the busiest device of its EP group.

Prefill (DeepSeek's day-6 design): a device computes `tokens` prompt tokens per step in two micro-batches;
routed experts are EP over the unit, MLA and shared experts data-parallel. The two micro-batches hide each
other's dispatch/combine (DeepEP normal kernels on `comm_sms` of the SMs), so a MoE layer costs its compute,
plus only the communication compute cannot cover.

Decode: a device holds `batch` sequences; each step runs 1 + drafts tokens per sequence through the model
(MTP drafts verified in the same forward) and the MTP layer once per draft. DeepEP low-latency kernels send
each (token, expert) pair on its own, over NVLink inside the node and RDMA across; the five-stage pipeline
of two micro-batches hides them behind compute the same way.

EPLB balancedness b (mean / max device load) makes the busiest device do 1/b of the mean expert rows and
receive 1/b of the mean dispatch traffic.
"""

from __future__ import annotations

import math

from moe_pd.config.planner import DecodeConfig, HardwareConfig, PrefillConfig
from moe_pd.planner.costs import LayerCosts, destinations
from moe_pd.planner.roofline import Device, StepTime


def expert_slots(costs: LayerCosts, ep: int, redundant: int) -> int:
    """Routed-expert slots per device in each MoE layer."""
    return math.ceil((costs.cfg.n_routed_experts + redundant) / ep)


def _attention(dev: Device, costs: LayerCosts, layer: StepTime, rows: float, attn_flops: float,
               attn_bytes: float) -> None:
    """MLA: its projections as GEMMs, then core attention (BF16) reading `attn_bytes` of cache."""
    dev.gemm(layer, rows, costs.attn_params)
    dev.op(layer, attn_flops, attn_bytes, dev.attn_flops)


def _moe(dev: Device, costs: LayerCosts, layer: StepTime, rows: float, slots: int, balancedness: float) -> None:
    """Shared expert and gate on every row; routed experts on K rows per token, 1/b of the mean on the
    busiest device, reading its `slots` experts' weights once."""
    dev.gemm(layer, rows, costs.shared_params)
    dev.gemm(layer, rows, costs.gate_params, weight_bytes=2.0)
    expert_rows = rows * costs.cfg.num_experts_per_tok / balancedness
    dev.op(layer, 2.0 * expert_rows * costs.expert_params, slots * costs.expert_params * dev.weight_bytes,
           dev.gemm_flops)


def _overlap(layer: StepTime, comm: float, overlap: bool) -> StepTime:
    layer.comm = comm
    layer.exposed_comm = max(0.0, comm - layer.busy) if overlap else comm
    return layer


def prefill_step(costs: LayerCosts, hw: HardwareConfig, cfg: PrefillConfig, precision: str, tokens: float,
                 context: float, requests: float, input_tokens: float, kv_bytes: int) -> tuple[StepTime, float]:
    """(step time, KV-transfer seconds) for `tokens` computed tokens of `requests` prompts whose tokens
    attend to `context` keys on average; `input_tokens` (cached ones included) leave for decode as KV."""
    c = costs.cfg
    share = (hw.sms - cfg.comm_sms) / hw.sms if cfg.overlap and hw.sms > cfg.comm_sms > 0 else 1.0
    dev = Device(hw, precision, share)
    slots = expert_slots(costs, cfg.ep, cfg.num_redundant_experts)
    attn_flops = tokens * costs.prefill_attn_flops(context)

    dense = StepTime()
    _attention(dev, costs, dense, tokens, attn_flops, 0.0)
    dev.gemm(dense, tokens, costs.dense_mlp_params)

    moe = StepTime()
    _attention(dev, costs, moe, tokens, attn_flops, 0.0)
    _moe(dev, costs, moe, tokens, slots, cfg.balancedness)
    other_nodes, other_ranks = destinations(c, cfg.ep, hw.gpus_per_node)
    per_token = costs.dispatch_bytes(dev.fp8, dev.act_bytes) + costs.combine_bytes(dev.act_bytes)
    scale = tokens * per_token / cfg.balancedness
    # DeepEP's normal kernels: a token crosses RDMA once per other node, then NVLink to each device it needs.
    nodes = math.ceil(cfg.ep / hw.gpus_per_node)
    rdma, nvlink = (scale * other_nodes, scale * other_ranks) if nodes > 1 else (0.0, scale * other_ranks)
    _overlap(moe, dev.link_seconds(rdma, nvlink, cfg.ep - 1), cfg.overlap)

    step = StepTime()
    step.merge(dense, c.first_k_dense_replace)
    step.merge(moe, c.num_moe_layers + costs.mtp_layers)
    dev.gemm(step, tokens * costs.mtp_layers, costs.mtp_proj_params)
    dev.gemm(step, requests * (1 + costs.mtp_layers), costs.vocab_params, weight_bytes=2.0)
    micro_batches = 2 if cfg.overlap else 1
    step.overhead = (hw.op_overhead_us * 1e-6 * micro_batches * (c.num_hidden_layers + costs.mtp_layers)
                     + hw.step_overhead_ms * 1e-3 + dev.latency(cfg.ep - 1))
    # The prompt's whole KV (cached prefix included) leaves for a decode device in another unit, over RDMA.
    kv_seconds = input_tokens * costs.kv_bytes_per_token(kv_bytes) / (hw.rdma_bw * hw.eff_net * 1e9)
    return step, kv_seconds


def decode_step(costs: LayerCosts, hw: HardwareConfig, cfg: DecodeConfig, precision: str, batch: float,
                kv_len: float, drafts: int) -> StepTime:
    """One decode step of `batch` sequences of `kv_len` cached tokens, verifying `drafts` MTP drafts each."""
    c = costs.cfg
    dev = Device(hw, precision)
    slots = expert_slots(costs, cfg.ep, cfg.num_redundant_experts)
    rows = batch * (1 + drafts)
    kv_read = batch * kv_len * (c.kv_lora_rank + c.qk_rope_head_dim) * cfg.kv_bytes
    attn_flops = rows * costs.decode_attn_flops(kv_len)

    dense = StepTime()
    _attention(dev, costs, dense, rows, attn_flops, kv_read)
    dev.gemm(dense, rows, costs.dense_mlp_params)

    def moe_layer(rows: float, attn_flops: float) -> StepTime:
        layer = StepTime()
        _attention(dev, costs, layer, rows, attn_flops, kv_read)
        _moe(dev, costs, layer, rows, slots, cfg.balancedness)
        nodes = math.ceil(cfg.ep / hw.gpus_per_node)
        local = min(cfg.ep, hw.gpus_per_node)
        pair = costs.dispatch_bytes(dev.fp8, dev.act_bytes) + costs.combine_bytes(dev.act_bytes)
        pairs = rows * c.num_experts_per_tok * pair / cfg.balancedness
        rdma = pairs * (cfg.ep - local) / cfg.ep if nodes > 1 else 0.0
        nvlink = pairs * (local - 1) / cfg.ep
        return _overlap(layer, dev.link_seconds(rdma, nvlink, cfg.ep - 1), cfg.overlap)

    step = StepTime()
    step.merge(dense, c.first_k_dense_replace)
    step.merge(moe_layer(rows, attn_flops), c.num_moe_layers)
    dev.gemm(step, rows, costs.vocab_params, weight_bytes=2.0)
    if drafts and costs.mtp_layers:
        draft = moe_layer(batch, batch * costs.decode_attn_flops(kv_len))
        dev.gemm(draft, batch, costs.mtp_proj_params)
        dev.gemm(draft, batch, costs.vocab_params, weight_bytes=2.0)
        step.merge(draft, drafts)
    micro_batches = 2 if cfg.overlap else 1
    layers = c.num_hidden_layers + (drafts if costs.mtp_layers else 0)
    step.overhead = hw.op_overhead_us * 1e-6 * micro_batches * layers + hw.step_overhead_ms * 1e-3 \
        + dev.latency(cfg.ep - 1)
    return step
