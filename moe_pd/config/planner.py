"""Schema of `python -m moe_pd.planner`: the hardware, the workload and the two phases' layouts.

The planner is arithmetic (moe_pd/planner/); these dataclasses are its inputs. Hardware presets in
conf/hardware/ cite a datasheet for every peak figure and keep the fitted efficiency factors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from moe_pd.config.errors import check, check_choice
from moe_pd.config.model import ModelConfig


@dataclass
class HardwareConfig:
    """One accelerator (peak figures per device) and how many share a node."""

    name: str = "h800"
    """Label printed in the report."""
    flops_bf16: float = 989.0
    """Dense BF16 tensor-core peak, TFLOP/s (no sparsity)."""
    flops_fp8: float = 1979.0
    """Dense FP8 tensor-core peak, TFLOP/s; 0 means no FP8 (FP8 work runs at flops_bf16)."""
    hbm_bw: float = 3350.0
    """Memory bandwidth, GB/s."""
    hbm_gb: float = 80.0
    """Memory size, GB."""
    nvlink_bw: float = 200.0
    """Intra-node bandwidth per device and direction, GB/s."""
    rdma_bw: float = 50.0
    """Inter-node (RDMA NIC) bandwidth per device and direction, GB/s."""
    gpus_per_node: int = 8
    """Devices per node; all-to-all traffic between nodes goes over RDMA, inside a node over NVLink."""
    sms: int = 132
    """Streaming multiprocessors (compute units); prefill.comm_sms of them serve communication."""
    reserved_gb: float = 8.0
    """Memory per device held by neither weights nor KV cache (activations, communication buffers, graphs)."""
    eff_gemm: float = 0.5
    """Achieved fraction of the tensor-core peak in GEMMs and grouped GEMMs (fitted, see docs/planner.md)."""
    eff_attn: float = 0.5
    """Achieved fraction of the BF16 peak in core attention (fitted)."""
    eff_hbm: float = 0.9
    """Achieved fraction of the memory bandwidth in memory-bound kernels."""
    eff_net: float = 0.5
    """Achieved fraction of NVLink / RDMA bandwidth in dispatch and combine (fitted)."""
    op_overhead_us: float = 0.0
    """Fixed cost per layer and micro-batch step (launches, host work); matters on CPUs, ~0 under CUDA graphs."""
    comm_latency_us: float = 0.0
    """Fixed cost of one dispatch or combine (a round trip through the network)."""
    step_overhead_ms: float = 0.0
    """Fixed cost of one engine step outside the layers (scheduling, sampling, control exchange)."""
    comm_latency_per_peer_us: float = 0.0
    """Added to comm_latency_us once per other rank of the group (gloo's pairwise exchanges on the CPU)."""
    shared_cores: int = 0
    """CPU path: every rank of the machine shares this many cores (0: each device is its own)."""

    def __post_init__(self) -> None:
        for name in ("flops_bf16", "hbm_bw", "hbm_gb", "nvlink_bw", "rdma_bw"):
            check(getattr(self, name) > 0, f"hardware.{name}", getattr(self, name), "must be > 0")
        check(self.flops_fp8 >= 0, "hardware.flops_fp8", self.flops_fp8, "must be >= 0 (0: no FP8)")
        check(self.gpus_per_node > 0, "hardware.gpus_per_node", self.gpus_per_node, "must be > 0")
        check(self.sms >= 0, "hardware.sms", self.sms, "must be >= 0")
        check(0 <= self.reserved_gb < self.hbm_gb, "hardware.reserved_gb", self.reserved_gb,
              f"must be in [0, hbm_gb={self.hbm_gb})")
        for name in ("eff_gemm", "eff_attn", "eff_hbm", "eff_net"):
            value = getattr(self, name)
            check(0 < value <= 1, f"hardware.{name}", value, "must be in (0, 1]")
        check(self.shared_cores >= 0, "hardware.shared_cores", self.shared_cores, "must be >= 0")
        for name in ("op_overhead_us", "comm_latency_us", "step_overhead_ms", "comm_latency_per_peer_us"):
            check(getattr(self, name) >= 0, f"hardware.{name}", getattr(self, name), "must be >= 0")


@dataclass
class WorkloadConfig:
    """The traffic: request shapes, prefix-cache hits, latency targets and load."""

    input_len: int = 4383
    """Mean prompt tokens per request, cached prefix included (as DeepSeek counts input)."""
    output_len: int = 1211
    """Mean generated tokens per request."""
    cache_hit_rate: float = 0.563
    """Fraction of input tokens found in the prefix cache: no prefill compute, still input."""
    kv_len: Optional[int] = None
    """Mean KV length a decode step reads per sequence; null: input_len + output_len / 2."""
    ttft_slo_s: Optional[float] = None
    """Time-to-first-token target; null: none."""
    tpot_slo_ms: Optional[float] = None
    """Time-per-output-token target; bounds the decode batch; null: none."""
    request_rate: Optional[float] = None
    """Target load, requests/s, that sets the node counts; null: size one deployment unit of each phase."""

    def __post_init__(self) -> None:
        check(self.input_len > 0, "workload.input_len", self.input_len, "must be > 0")
        check(self.output_len > 0, "workload.output_len", self.output_len, "must be > 0")
        check(0 <= self.cache_hit_rate < 1, "workload.cache_hit_rate", self.cache_hit_rate, "must be in [0, 1)")
        check(self.kv_len is None or self.kv_len > 0, "workload.kv_len", self.kv_len, "must be > 0 or null")
        for name in ("ttft_slo_s", "tpot_slo_ms", "request_rate"):
            value = getattr(self, name)
            check(value is None or value > 0, f"workload.{name}", value, "must be > 0 or null")


@dataclass
class PrefillConfig:
    """The prefill service: one EP group (a deployment unit) with DP attention, two micro-batches."""

    ep: int = 32
    """Devices per prefill unit (routed experts split over them; MLA and shared experts data-parallel)."""
    batch_tokens: int = 16384
    """Tokens one device computes per step (DeepSeek's profile: 16K), split into two micro-batches."""
    num_redundant_experts: int = 32
    """Extra expert slots of the unit (DeepSeek: 32)."""
    balancedness: float = 0.86
    """EPLB balancedness (mean / max device load); 0.86: ours at EP32, zipf s=0.8 (perf/results)."""
    comm_sms: int = 24
    """SMs given to dispatch/combine kernels (DeepSeek's prefill profile: 24 of 132)."""
    overlap: bool = True
    """Two-micro-batch overlap: all-to-all hidden behind the other micro-batch's compute."""

    def __post_init__(self) -> None:
        check(self.ep > 0, "prefill.ep", self.ep, "must be > 0")
        check(self.batch_tokens > 0, "prefill.batch_tokens", self.batch_tokens, "must be > 0")
        check(self.num_redundant_experts >= 0, "prefill.num_redundant_experts", self.num_redundant_experts,
              "must be >= 0")
        check(0 < self.balancedness <= 1, "prefill.balancedness", self.balancedness, "must be in (0, 1]")
        check(self.comm_sms >= 0, "prefill.comm_sms", self.comm_sms, "must be >= 0")


@dataclass
class DecodeConfig:
    """The decode service: one EP group with DP attention, the five-stage two-micro-batch pipeline."""

    ep: int = 144
    """Devices per decode unit."""
    max_batch: int = 128
    """Largest batch of sequences per device (DeepSeek's decode profile: 128)."""
    num_redundant_experts: int = 32
    """Extra expert slots of the unit."""
    balancedness: float = 0.61
    """EPLB balancedness; 0.61: ours at EP144, zipf s=0.8 (perf/results)."""
    mtp_draft_tokens: Optional[int] = None
    """Tokens drafted per step by the MTP layer; null: the checkpoint's MTP layers (1 for V3), 0: no MTP."""
    mtp_accept_len: float = 1.85
    """Tokens accepted per step per sequence (1 + accepted drafts); DeepSeek-V3 reports 85-90% acceptance of
    the second token, hence 1.85 with one draft."""
    kv_bytes: int = 2
    """Bytes per cached latent element (2: BF16 cache as FlashMLA; 1: FP8)."""
    overlap: bool = True
    """Five-stage pipeline: all-to-all hidden behind the other micro-batch's compute."""

    def __post_init__(self) -> None:
        check(self.ep > 0, "decode.ep", self.ep, "must be > 0")
        check(self.max_batch > 0, "decode.max_batch", self.max_batch, "must be > 0")
        check(self.num_redundant_experts >= 0, "decode.num_redundant_experts", self.num_redundant_experts,
              "must be >= 0")
        check(0 < self.balancedness <= 1, "decode.balancedness", self.balancedness, "must be in (0, 1]")
        check(self.mtp_draft_tokens is None or self.mtp_draft_tokens >= 0, "decode.mtp_draft_tokens",
              self.mtp_draft_tokens, "must be >= 0 or null")
        check(self.mtp_accept_len >= 1, "decode.mtp_accept_len", self.mtp_accept_len, "must be >= 1")
        check_choice("decode.kv_bytes", self.kv_bytes, (1, 2, 4))


@dataclass
class PlannerConfig:
    """`python -m moe_pd.planner`: sizes the prefill and decode clusters and says what bounds each."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture (a preset, or model.path with a config.json)."""
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    """Accelerator preset."""
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    """Traffic."""
    prefill: PrefillConfig = field(default_factory=PrefillConfig)
    """Prefill unit."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """Decode unit."""
    weights: str = "auto"
    """Weight format of GEMMs: fp8 (128x128 blocks), bf16, fp32 (the CPU path), or auto (config.json's
    quantization_config when model.path is set, else fp8 for DeepSeek-V3 and bf16 for V2)."""
    output: str = "table"
    """table (human-readable) or json (the table, then one JSON object as the last line of stdout)."""

    def __post_init__(self) -> None:
        check_choice("weights", self.weights, ("auto", "fp8", "bf16", "fp32"))
        check_choice("output", self.output, ("table", "json"))
