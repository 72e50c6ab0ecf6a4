"""ParallelState: the rank layout, created once from the torchrun environment and the config, then passed
to whatever needs it (no module globals). Every EP rank is also a DP-attention rank.

The layout is checked before any process group exists, so a bad combination fails in milliseconds
instead of after a rendezvous.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moe_pd.config.errors import ConfigError
from moe_pd.config.model import ModelConfig
from moe_pd.config.parallel import ParallelConfig
from moe_pd.parallel.placement import ExpertPlacement


@dataclass(frozen=True)
class ParallelState:
    rank: int
    world_size: int
    local_rank: int
    ep_size: int
    ep_rank: int
    dp_size: int
    dp_rank: int
    num_experts: int
    """Physical expert slots over the EP group (routed experts + redundant replicas)."""
    device: torch.device
    backend: str
    group: Any = None
    """The EP process group (the default group today); None for a single process."""

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def experts_per_rank(self) -> int:
        """Physical expert slots per rank."""
        return self.num_experts // self.ep_size

    @staticmethod
    def single(num_experts: int, device: torch.device | str = "cpu") -> "ParallelState":
        return ParallelState(0, 1, 0, 1, 0, 1, 0, num_experts, torch.device(device), "none")


def validate_layout(world_size: int, parallel: ParallelConfig, model: ModelConfig) -> int:
    """Returns the EP size, or raises ConfigError naming the offending field."""
    ep = parallel.ep_size or world_size
    if ep != world_size:
        raise ConfigError(f"parallel.ep_size={ep}: must equal the world size {world_size} "
                          "(every rank is one EP rank with data-parallel attention)")
    slots = model.n_routed_experts + parallel.num_redundant_experts
    if ep > slots:
        raise ConfigError(f"parallel.ep_size={ep}: more ranks than expert slots ({model.n_routed_experts} routed "
                          f"+ {parallel.num_redundant_experts} redundant)")
    if slots % ep:
        raise ConfigError(f"model.n_routed_experts={model.n_routed_experts} + parallel.num_redundant_experts="
                          f"{parallel.num_redundant_experts} = {slots} slots: must be divisible by the EP size {ep}")
    if parallel.dispatcher == "local" and ep > 1:
        raise ConfigError(f"parallel.dispatcher='local' holds every expert on one rank; world size is {ep}")
    if ep == 1 and parallel.num_redundant_experts:
        raise ConfigError("parallel.num_redundant_experts: replicas need EP > 1 (one rank holds every expert)")
    return ep


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def join_process_group(backend: str, **kwargs) -> None:
    """dist.init_process_group, guarded against a torch quirk: torch.distributed.nn.functional binds
    `group=group.WORLD` as default arguments when first imported, and torch imports it lazily (building a
    model on the meta device does). Imported after the group exists, it keeps the group alive past
    destroy_process_group, and gloo's threads then meet static destructors at exit, which can abort a rank
    that finished cleanly ("terminate called without an active exception"). Imported first, the defaults
    are None."""
    import torch.distributed.nn.functional  # noqa: F401

    dist.init_process_group(backend, **kwargs)


def init_parallel(parallel: ParallelConfig, model: ModelConfig, device: torch.device) -> ParallelState:
    """Validates the layout, then joins the process group (a no-op for one process)."""
    rank, world, local_rank = env_world()
    ep = validate_layout(world, parallel, model)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    slots = model.n_routed_experts + parallel.num_redundant_experts
    if world == 1:
        return ParallelState.single(slots, device)
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        # The process-group timeout is a backstop; the watchdog reports hangs long before it.
        timeout = datetime.timedelta(seconds=max(2 * parallel.collective_timeout_s, 600))
        join_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    return ParallelState(rank, world, local_rank, ep, rank, world, rank, slots, device, backend, dist.group.WORLD)


def shutdown(state: ParallelState) -> None:
    """Destroys the process groups and drops the state's handle on them, so the group is freed (and gloo
    joins its threads) now, not by static destructors at exit (see join_process_group)."""
    if state.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    object.__setattr__(state, "group", None)  # frozen for users; shutdown alone ends the group's life


def default_placement(state: ParallelState, model: ModelConfig) -> ExpertPlacement:
    """Contiguous slots, redundant ones replicating experts 0, 1, ...; MoE layers indexed from 0, the MTP
    layers' after the decoder layers' (ModelConfig.num_expert_layers)."""
    return ExpertPlacement.contiguous(model.num_expert_layers, model.n_routed_experts,
                                      state.num_experts - model.n_routed_experts, state.ep_size,
                                      first_layer=model.first_k_dense_replace)
