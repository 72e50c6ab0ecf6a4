"""Parallel layout schema: how the ranks of one instance split the experts."""

from __future__ import annotations

from dataclasses import dataclass

from moe_pd.config.errors import check_choice

DISPATCHERS = ("local",)


@dataclass
class ParallelConfig:
    """Expert parallelism with data-parallel attention; one process is EP = 1."""

    dispatcher: str = "local"
    """Token dispatcher backend for MoE layers; 'local' keeps every expert on this rank."""
    backend: str = "auto"
    """torch.distributed backend: 'auto' (nccl on CUDA, gloo on CPU), 'gloo' or 'nccl'."""

    def __post_init__(self) -> None:
        check_choice("parallel.dispatcher", self.dispatcher, DISPATCHERS)
        check_choice("parallel.backend", self.backend, ("auto", "gloo", "nccl"))
