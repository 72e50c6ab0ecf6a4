"""torchrun worker: the MTP layer expert-parallel over the ranks (all-to-all dispatcher, the default placement
with redundant slots, EPLB recording) gives each rank the MTP logits of the single-process model.

Each rank takes its own prompt (different lengths: DP attention), runs the main model and then the MTP module
over it through the paged cache, and compares with a one-process model holding every expert. The load
recorder, summed over the ranks, counts the MTP layer's routing in its own row. Exits 1 on a mismatch."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1]))
from helpers.runner import mtp_logits  # noqa: E402
from helpers.tiny import TINY  # noqa: E402
from moe_pd.config.eplb import EplbConfig  # noqa: E402
from moe_pd.config.parallel import ParallelConfig  # noqa: E402
from moe_pd.eplb.manager import make_eplb_manager  # noqa: E402
from moe_pd.kvcache.paged import AttentionBatch, PagedLatentCache  # noqa: E402
from moe_pd.model.loader import build_model  # noqa: E402
from moe_pd.parallel.dispatch import make_dispatcher  # noqa: E402
from moe_pd.parallel.state import default_placement, init_parallel, shutdown  # noqa: E402

PROMPTS = [[256, *b"expert parallel MTP"], [256, *b"abc"], [256, *range(60, 90)], [256, 9]]


def ep_mtp_logits(model, dispatcher, state, ids: list[int]) -> torch.Tensor:
    cfg, block = model.cfg, 4
    pages = -(-len(ids) // block)
    cache = PagedLatentCache(model.num_cache_layers, pages, block, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    batch = AttentionBatch.build([list(range(pages))], [0], [len(ids) - 1], block)
    most = torch.tensor([len(ids) - 1])
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=state.group)  # every rank picks the same exchange
    dispatcher.begin_step(int(most))
    with torch.inference_mode():
        states = model(torch.tensor(ids[:-1]), batch, cache)
        return model.mtp[0].logits(model.mtp_forward(torch.tensor(ids[1:]), states, batch, cache))


def main() -> int:
    parallel = ParallelConfig(num_redundant_experts=4)
    state = init_parallel(parallel, TINY, torch.device("cpu"))
    placement = default_placement(state, TINY)
    dispatcher = make_dispatcher(parallel, state, TINY.hidden_size, placement, None, TINY.num_experts_per_tok,
                                 torch.float32)
    model = build_model(TINY, dispatcher=dispatcher, mtp=True,
                        expert_ids=lambda layer: placement.rank_experts(state.ep_rank, layer))
    manager = make_eplb_manager(EplbConfig(enabled=True), state, TINY, model, dispatcher)
    manager.recorder.begin_step()
    ids = PROMPTS[state.rank % len(PROMPTS)]
    got = ep_mtp_logits(model, dispatcher, state, ids)
    want = mtp_logits(build_model(TINY, mtp=True), ids)
    load = manager.stats().expert_load_LE  # summed over the ranks
    tokens = torch.tensor([len(ids) - 1])
    dist.all_reduce(tokens, group=state.group)
    shutdown(state)
    failures = []
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        failures.append(f"rank {state.rank}: MTP logits differ by {(got - want).abs().max().item():.3g}")
    if load.shape[0] != TINY.num_expert_layers or int(load[-1].sum()) != int(tokens) * TINY.num_experts_per_tok:
        failures.append(f"rank {state.rank}: MTP row of the load {load[-1].tolist()} for {int(tokens)} tokens")
    if failures:
        print("\n".join(failures), file=sys.stderr)
        return 1
    print(f"rank {state.rank}: MTP logits match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
