"""torchrun worker (any R, also 1): the overlapped forward against the plain one, prefill and decode.

Each rank holds 1/R of the experts; prompts differ per rank (one rank gets none, to exercise empty
micro-batches). Writes OUT_DIR/rank<r>.json (OUT_DIR: the first argument): the largest relative difference
per phase and whether the process group was freed by shutdown; tests/dist/test_overlap.py asserts on it.
"""

from __future__ import annotations

import gc
import json
import sys
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1]))
from helpers.runner import fresh_cache  # noqa: E402
from helpers.tiny import TINY  # noqa: E402
from moe_pd.config import ParallelConfig  # noqa: E402
from moe_pd.kvcache.paged import AttentionBatch  # noqa: E402
from moe_pd.model.loader import build_model  # noqa: E402
from moe_pd.overlap.micro_batch import split_step  # noqa: E402
from moe_pd.overlap.schedule import DECODE, PREFILL, forward_two_micro_batches  # noqa: E402
from moe_pd.parallel.dispatch import make_dispatcher  # noqa: E402
from moe_pd.parallel.state import default_placement, init_parallel, shutdown  # noqa: E402


def main() -> int:
    state = init_parallel(ParallelConfig(), TINY, torch.device("cpu"))
    placement = default_placement(state, TINY)
    model = build_model(TINY, dispatcher=make_dispatcher(ParallelConfig(), state, TINY.hidden_size, placement),
                        expert_ids=lambda layer: placement.rank_experts(state.ep_rank, layer))
    gen = torch.Generator().manual_seed(state.rank)
    lens = [] if state.world_size > 1 and state.rank == 1 else [23, 5, 12 + state.rank]
    tables, next_page = [], 0
    for n in lens:
        tables.append(list(range(next_page, next_page + n // 4 + 2)))
        next_page += n // 4 + 2
    ids = torch.randint(0, 256, (sum(lens),), generator=gen)
    worst = {}
    caches = (fresh_cache(model), fresh_cache(model))
    steps = [(ids, AttentionBatch.build(tables, [0] * len(lens), lens, 4)),
             (torch.randint(0, 256, (len(lens),), generator=gen), AttentionBatch.build(tables, lens, [1] * len(lens), 4))]
    for schedule, (step_ids, batch) in zip((PREFILL, DECODE), steps):
        with torch.inference_mode():
            plain = model(step_ids, batch, caches[0])
            overlapped = forward_two_micro_batches(model, split_step(step_ids, batch), caches[1], schedule)
        worst[schedule.name] = float((plain - overlapped).abs().max() / plain.abs().max()) if plain.numel() else 0.0
    group = weakref.ref(state.group) if state.group is not None else None
    if dist.is_initialized():
        dist.barrier()
    # The model still holds the dispatcher and the state: shutdown must free the group all the same, or gloo's
    # threads are left to static destructors, which can abort a rank after it passed.
    shutdown(state)
    gc.collect()
    report = {"rank": state.rank, "tokens": sum(lens), "relative_diff": worst,
              "group_freed": group is None or group() is None}
    (Path(sys.argv[1]) / f"rank{state.rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
