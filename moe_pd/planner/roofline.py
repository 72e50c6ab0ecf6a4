"""Rooflines of one device: each operation takes the longer of its FLOPs at the achieved tensor-core rate
and its bytes at the achieved memory rate; a step adds its operations up and keeps, per bound, how much
time went where."""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_pd.config.planner import HardwareConfig

COMPUTE, HBM, ALL_TO_ALL = "compute", "HBM", "all-to-all"


@dataclass
class StepTime:
    """Seconds of one step on the busiest device, by what bound them."""

    parts: dict[str, float] = field(default_factory=lambda: {COMPUTE: 0.0, HBM: 0.0})
    comm: float = 0.0
    """All-to-all time in total (hidden or not)."""
    exposed_comm: float = 0.0
    """The part of `comm` that compute did not cover."""
    overhead: float = 0.0
    """Fixed per-layer and per-step costs."""

    def add(self, bound: str, seconds: float) -> None:
        self.parts[bound] = self.parts.get(bound, 0.0) + seconds

    @property
    def busy(self) -> float:
        return sum(self.parts.values())

    @property
    def total(self) -> float:
        return self.busy + self.exposed_comm + self.overhead

    @property
    def bound(self) -> str:
        """all-to-all when communication set the pace of at least half the step, else compute or HBM."""
        if self.exposed_comm > 0 and self.comm >= 0.5 * self.total:
            return ALL_TO_ALL
        return max(self.parts, key=self.parts.get)

    def merge(self, other: StepTime, times: float = 1.0) -> None:
        for k, v in other.parts.items():
            self.add(k, v * times)
        self.comm += other.comm * times
        self.exposed_comm += other.exposed_comm * times
        self.overhead += other.overhead * times

    def summary(self) -> dict[str, float]:
        return {**{f"{k}_s": v for k, v in self.parts.items()}, "all_to_all_s": self.comm,
                "exposed_all_to_all_s": self.exposed_comm, "overhead_s": self.overhead, "step_s": self.total}


@dataclass(frozen=True)
class Device:
    """Achieved rates of one device (peaks times the fitted efficiencies), for a share of its SMs."""

    hw: HardwareConfig
    precision: str
    """Format of GEMM weights and dispatch payloads: fp8 (128x128 blocks), bf16 or fp32 (the CPU path)."""
    sm_share: float = 1.0
    """Fraction of the compute units left to compute kernels (the rest run communication)."""

    @property
    def fp8(self) -> bool:
        return self.precision == "fp8"

    @property
    def gemm_flops(self) -> float:
        """GEMMs in the weights' format: FP8 where the device has it, else the BF16 (CPU: fp32) rate."""
        peak = self.hw.flops_fp8 if self.fp8 and self.hw.flops_fp8 > 0 else self.hw.flops_bf16
        return peak * 1e12 * self.hw.eff_gemm * self.sm_share

    @property
    def bf16_gemm_flops(self) -> float:
        """GEMMs kept in BF16 whatever the weights' format (gate, LM head)."""
        return self.hw.flops_bf16 * 1e12 * self.hw.eff_gemm * self.sm_share

    @property
    def attn_flops(self) -> float:
        return self.hw.flops_bf16 * 1e12 * self.hw.eff_attn * self.sm_share

    @property
    def hbm(self) -> float:
        return self.hw.hbm_bw * 1e9 * self.hw.eff_hbm

    @property
    def weight_bytes(self) -> float:
        return {"fp8": 1.0, "bf16": 2.0, "fp32": 4.0}[self.precision]

    @property
    def act_bytes(self) -> float:
        """Bytes of one activation element outside FP8 GEMMs (BF16 on GPUs, fp32 on the CPU path)."""
        return 4.0 if self.precision == "fp32" else 2.0

    def op(self, step: StepTime, flops: float, bytes_: float, flops_rate: float) -> float:
        """Adds one operation to `step` at its roofline; returns its seconds."""
        t_flops, t_bytes = flops / flops_rate, bytes_ / self.hbm
        step.add(COMPUTE if t_flops >= t_bytes else HBM, max(t_flops, t_bytes))
        return max(t_flops, t_bytes)

    def gemm(self, step: StepTime, rows: float, params: float, weight_bytes: float | None = None) -> float:
        """[rows, k] x [k, n] with k*n = params: weights read once, activations in and out ignored.
        `weight_bytes` set means a GEMM outside the weights' format (BF16, or fp32 on the CPU path)."""
        if weight_bytes is None:
            wb, rate = self.weight_bytes, self.gemm_flops
        else:
            wb, rate = max(weight_bytes, self.act_bytes), self.bf16_gemm_flops
        return self.op(step, 2.0 * rows * params, params * wb, rate)

    def latency(self, peers: int) -> float:
        """Fixed seconds of one collective among 1 + `peers` ranks."""
        return (self.hw.comm_latency_us + self.hw.comm_latency_per_peer_us * peers) * 1e-6 if peers else 0.0

    def link_seconds(self, rdma_bytes: float, nvlink_bytes: float, peers: int) -> float:
        """Dispatch plus combine: RDMA and NVLink run in parallel, the slower sets the time; each of the
        two pays the collective's fixed latency once."""
        net = self.hw.eff_net * 1e9
        return (max(rdma_bytes / (self.hw.rdma_bw * net), nvlink_bytes / (self.hw.nvlink_bw * net))
                + 2 * self.latency(peers))
