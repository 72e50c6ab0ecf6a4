"""Parallel layout schema: how the ranks of one instance split the experts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from moe_pd.config.errors import check, check_choice

DISPATCHERS = ("auto", "local", "all_to_all", "deepep", "nvshmem")


@dataclass
class ParallelConfig:
    """Expert parallelism over every rank of the job, with data-parallel attention (one process: EP = 1)."""

    dispatcher: str = "auto"
    """Token dispatcher: 'auto' (local for one rank, all_to_all otherwise), 'local', 'all_to_all',
    'deepep' (DeepEP, GPUs; deepep_api picks V1 Buffer or V2 ElasticBuffer) or 'nvshmem' (nvshmem4py
    one-sided puts, GPU)."""
    backend: str = "auto"
    """torch.distributed backend: 'auto' (nccl on CUDA, gloo on CPU), 'gloo' or 'nccl'."""
    ep_size: Optional[int] = None
    """Expert-parallel ranks; null means the world size (the only layout supported today)."""
    num_redundant_experts: int = 0
    """Extra physical expert slots holding replicas of hot experts (DeepSeek: 32); (routed experts +
    redundant) must split evenly over the EP ranks."""
    fp8_dispatch: bool = False
    """Send dispatch payloads as FP8 e4m3 with per-token 1x128 scales, as DeepSeek does (combine stays
    in the activation dtype)."""
    deepep_api: str = "v1"
    """DeepEP API: 'v1' (deep_ep.Buffer: normal and low-latency kernels on NVSHMEM, receive hooks) or 'v2'
    (deep_ep.ElasticBuffer on NCCL's GIN backend: one dispatch for both, no receive hook); docs/deepep.md."""
    deepep_mode: str = "auto"
    """DeepEP use: 'normal' (prefill: throughput, the host learns the counts), 'low_latency' (decode: static
    shapes, no host sync) or 'auto' (low latency when no rank has more than
    deepep_max_dispatch_tokens_per_rank tokens in the step)."""
    deepep_max_dispatch_tokens_per_rank: int = 128
    """Low-latency capacity: tokens one rank may send per decode step (DeepEP recommends < 256)."""
    deepep_max_tokens_per_rank: int = 4096
    """V2 only: the most tokens one rank dispatches in any step (sizes the ElasticBuffer; at least the
    scheduler's max_num_batched_tokens)."""
    padded_max_tokens: int = 128
    """all_to_all backend: when no rank runs more tokens than this in a step (decode), exchange fixed-size
    buffers instead of exchanging counts first, so dispatch never blocks (0: always exchange counts)."""
    collective_timeout_s: float = 300.0
    """Watchdog: a collective unfinished after this long dumps every rank's flight recorder and ends the
    job with a message naming the slowest rank; 0 disables the watchdog."""
    flight_recorder_size: int = 512
    """Collectives remembered per rank for the hang report."""
    dry_run_world_size: Optional[int] = None
    """For `python -m moe_pd.dry_run`: ranks to lay out in one process on a fake process group."""

    def __post_init__(self) -> None:
        check_choice("parallel.dispatcher", self.dispatcher, DISPATCHERS)
        check_choice("parallel.backend", self.backend, ("auto", "gloo", "nccl"))
        check_choice("parallel.deepep_mode", self.deepep_mode, ("auto", "normal", "low_latency"))
        check_choice("parallel.deepep_api", self.deepep_api, ("v1", "v2"))
        check(self.ep_size is None or self.ep_size > 0, "parallel.ep_size", self.ep_size, "must be > 0 or null")
        check(self.num_redundant_experts >= 0, "parallel.num_redundant_experts", self.num_redundant_experts,
              "must be >= 0")
        check(self.padded_max_tokens >= 0, "parallel.padded_max_tokens", self.padded_max_tokens, "must be >= 0")
        check(self.collective_timeout_s >= 0, "parallel.collective_timeout_s", self.collective_timeout_s,
              "must be >= 0 (0 disables the watchdog)")
        check(self.flight_recorder_size > 0, "parallel.flight_recorder_size", self.flight_recorder_size,
              "must be > 0")
        check(self.deepep_max_dispatch_tokens_per_rank > 0, "parallel.deepep_max_dispatch_tokens_per_rank",
              self.deepep_max_dispatch_tokens_per_rank, "must be > 0")
        check(self.deepep_max_tokens_per_rank >= self.deepep_max_dispatch_tokens_per_rank,
              "parallel.deepep_max_tokens_per_rank", self.deepep_max_tokens_per_rank,
              "must be >= parallel.deepep_max_dispatch_tokens_per_rank")
        check(self.dry_run_world_size is None or self.dry_run_world_size > 0, "parallel.dry_run_world_size",
              self.dry_run_world_size, "must be > 0 or null")
