"""Dry run of a rank layout: `python -m moe_pd.dry_run model=deepseek_v3 parallel.dry_run_world_size=144`.

Builds the layout of every rank in one process, joins torch's fake process group as rank 0, creates that
rank's dispatcher and its model slice on the meta device (no memory), and prints the expert placement
and per-rank weight sizes. It checks a 144-rank DeepSeek-V3 layout on a laptop in seconds; no data moves.
"""

from __future__ import annotations

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from moe_pd.config.errors import ConfigError, exit_on
from moe_pd.config.generate import GenerateConfig
from moe_pd.config.hf import resolve_model_config
from moe_pd.config.store import register_configs, to_config
from moe_pd.model.transformer import DeepseekForCausalLM
from moe_pd.parallel.dispatch import make_dispatcher
from moe_pd.parallel.state import ParallelState, default_placement, join_process_group, validate_layout


def describe_ids(ids: list[int]) -> str:
    return f"{ids[0]}..{ids[-1]}" if len(ids) > 2 else ",".join(map(str, ids))


def dry_run(cfg: GenerateConfig) -> str:
    model_cfg = resolve_model_config(cfg.model)
    world = cfg.parallel.dry_run_world_size or 1
    ep = validate_layout(world, cfg.parallel, model_cfg)
    from torch.testing._internal.distributed.fake_pg import FakeStore

    join_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        slots = model_cfg.n_routed_experts + cfg.parallel.num_redundant_experts
        states = [ParallelState(r, world, r % 8, ep, r, world, r, slots, torch.device("cpu"), "fake",
                                dist.group.WORLD) for r in range(world)]
        placement = default_placement(states[0], model_cfg)
        dispatcher = make_dispatcher(cfg.parallel, states[0], model_cfg.hidden_size, placement) if world > 1 else None
        with torch.device("meta"):
            model = DeepseekForCausalLM(model_cfg, lambda layer: placement.rank_experts(0, layer), dispatcher)
        dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.runtime.dtype]
        expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        other_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." not in n)
    finally:
        dist.destroy_process_group()
    lines = [
        f"layout: {world} ranks, EP {ep} x DP-attention {world}, dispatcher "
        f"{type(dispatcher).__name__ if dispatcher else 'LocalDispatcher'}",
        f"model: {model_cfg.architecture}, {model_cfg.num_hidden_layers} layers ({model_cfg.num_moe_layers} MoE), "
        f"{model_cfg.n_routed_experts} routed experts, top-{model_cfg.num_experts_per_tok}",
        f"expert slots: {slots} ({model_cfg.n_routed_experts} routed + {cfg.parallel.num_redundant_experts} "
        "redundant replicas)",
        f"per rank: {states[0].experts_per_rank} routed expert slots/layer "
        f"({expert_params * dtype_bytes / 2**30:.2f} GiB), replicated attention, dense, shared, embeddings "
        f"({other_params * dtype_bytes / 2**30:.2f} GiB) in {cfg.runtime.dtype}",
        "rank  node  local  routed experts (global ids, every MoE layer)",
    ]
    first = model_cfg.first_k_dense_replace
    lines += [f"{s.rank:4d}  {s.rank // 8:4d}  {s.local_rank:5d}  {describe_ids(placement.rank_experts(s.rank, first))}"
              for s in states]
    return "\n".join(lines)


@hydra.main(config_path="pkg://moe_pd.conf", config_name="generate", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    with exit_on(ConfigError):
        print(dry_run(to_config(dict_cfg)))


register_configs()

if __name__ == "__main__":
    main()
