"""torchrun worker: the DeepEP adapters (V1 Buffer, V2 ElasticBuffer) against their conformance doubles.

1. MoE outputs, every mode and FP8 on/off, against the local backend and the all-reduce reference MoE
   (dispatch_worker.py's cases and references).
2. V1 low-latency: only the send phase runs in the start halves, the receive hooks in the wait halves.
3. The overlap schedules with a model whose MoE layers use each adapter: prefill (two micro-batches) and
   the five-stage decode pipeline give the plain forward's output. For V1 decode this also checks that no
   low-latency call is issued while the hook of the call two before is pending (DeepEP's two buffers);
   for V2, which has no hook, the stages run with the events of DeepEP's stream instead.
The doubles take fp32 here so the comparisons are exact; on GPUs DeepEP takes bf16.
It writes what it measured to OUT_DIR/rank<r>.json (OUT_DIR: the first argument); tests/dist/test_dispatch.py
asserts on it.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from dispatch_worker import D, E, compare_with_references, make_case  # noqa: E402

from helpers import deepep_double, deepep_v2_double  # noqa: E402
from helpers.runner import fresh_cache  # noqa: E402
from helpers.tiny import TINY  # noqa: E402
from moe_pd.kvcache.paged import AttentionBatch  # noqa: E402
from moe_pd.model.experts import grouped_swiglu, masked_swiglu  # noqa: E402
from moe_pd.model.loader import build_model  # noqa: E402
from moe_pd.overlap.micro_batch import split_step  # noqa: E402
from moe_pd.overlap.schedule import DECODE, PREFILL, forward_two_micro_batches  # noqa: E402
from moe_pd.parallel.dispatch.all_to_all import pack_fp8, unpack_fp8  # noqa: E402
from moe_pd.parallel.dispatch.deepep import DeepEPDispatcher  # noqa: E402
from moe_pd.parallel.dispatch.deepep_v2 import ElasticDeepEPDispatcher  # noqa: E402
from moe_pd.parallel.dispatch.local import LocalDispatcher  # noqa: E402
from moe_pd.parallel.placement import ExpertPlacement  # noqa: E402
from moe_pd.parallel.state import ParallelState, default_placement, join_process_group, shutdown  # noqa: E402

F, LL_TOKENS = 32, 16
deepep_double.Buffer.activation_dtypes = (torch.bfloat16, torch.float32)
deepep_v2_double.ElasticBuffer.activation_dtypes = (torch.bfloat16, torch.float32)


def v1(state, placement, hidden, mode, fp8):
    rdma = deepep_double.Buffer.get_low_latency_rdma_size_hint(LL_TOKENS, hidden, state.world_size,
                                                               placement.num_slots)
    normal = deepep_double.Buffer(dist.group.WORLD, 1 << 20, 0)
    ll = deepep_double.Buffer(dist.group.WORLD, 0, rdma, low_latency_mode=True,
                              num_qps_per_rank=placement.num_slots // state.world_size)
    return DeepEPDispatcher(state, hidden, placement, normal, ll, mode, LL_TOKENS, fp8)


def v2(state, placement, hidden, mode, fp8, top_k):
    buffer = deepep_v2_double.ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=256, hidden=hidden,
                                            num_topk=top_k, use_fp8_dispatch=fp8)
    return ElasticDeepEPDispatcher(state, hidden, placement, buffer, mode, 256, LL_TOKENS, fp8)


def experts(routed, w13, w2):
    if routed.x_ND.dim() == 3:  # the masked layout (V2 without CPU sync)
        return masked_swiglu(routed.x_ND, routed.counts_E, w13, w2)
    return grouped_swiglu(routed.x_ND, routed.counts_E, w13, w2)


def moe(dispatcher, x, ids, w, w13, w2):
    most = torch.tensor([x.shape[0]])
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    dispatcher.begin_step(int(most))
    routed = dispatcher.dispatch(x, ids, w, layer=0)
    return dispatcher.combine(experts(routed, w13, w2), routed.handle)


def check_moe(state, placement) -> list[dict]:
    rank, world = state.rank, state.world_size
    g = torch.Generator().manual_seed(1234)
    w13, w2 = torch.randn(E, 2 * F, D, generator=g) * 0.1, torch.randn(E, D, F, generator=g) * 0.1
    mine = list(range(rank * E // world, (rank + 1) * E // world))
    results = []
    for fp8 in (False, True):
        backends = [(f"v1 {m} fp8={fp8}", v1(state, placement, D, m, fp8)) for m in ("normal", "low_latency")]
        backends += [(f"v2 {m} fp8={fp8}", v2(state, placement, D, m, fp8, 4)) for m in ("normal", "low_latency")]
        for name, ep in backends:
            results += compare_with_references(name, ep, fp8, w13, w2, mine, rank, world, moe=moe)
    return results


def hook_order(state, placement) -> dict[str, list[str]]:
    """V1 low latency: the double's calls after each half (only the send phase should run in *_start)."""
    ep = v1(state, placement, D, "low_latency", False)
    ll = ep.low_latency
    x, ids, w = make_case("odd_t", state.rank, state.world_size, torch.Generator().manual_seed(5))
    pending = ep.dispatch_start(x, ids, w, layer=0)
    after_start = list(ll.calls)
    routed = ep.dispatch_wait(pending)
    after_wait = list(ll.calls)
    combine = ep.combine_start(routed.x_ND, routed.handle)
    after_combine_start = list(ll.calls)
    ep.combine_wait(combine)
    return {"dispatch_start": after_start, "dispatch_wait": after_wait, "combine_start": after_combine_start,
            "combine_wait": list(ll.calls)}


def misuse_refused(state, placement) -> dict[str, bool]:
    """Calls DeepEP would reject (or silently corrupt on): whether the doubles refused each."""
    x, ids, w = make_case("odd_t", state.rank, state.world_size, torch.Generator().manual_seed(7))
    ep1, ep2 = v1(state, placement, D, "low_latency", False), v2(state, placement, D, "normal", False, 4)
    buffer = ep2.buffer
    _, _, _, handle, _ = buffer.dispatch(x, topk_idx=ids, topk_weights=w, num_experts=E)
    ll = ep1.low_latency
    cases = {
        "v2 cached handle with topk_idx": lambda: buffer.dispatch(x, topk_idx=ids, handle=handle),
        "v2 cached handle with a CPU sync": lambda: buffer.dispatch(x, handle=handle, do_cpu_sync=True),
        "v2 more tokens than the buffer": lambda: buffer.dispatch(x, topk_idx=ids, num_experts=E,
                                                                  num_max_tokens_per_rank=2),
        "v2 combine of other rows": lambda: buffer.combine(x[:1], handle),
        "v2 bf16 weights": lambda: buffer.dispatch(x, topk_idx=ids, topk_weights=w.bfloat16(), num_experts=E),
        "v1 third low-latency call over a pending hook": lambda: [
            ll.low_latency_dispatch(x, ids, LL_TOKENS, E, use_fp8=False, return_recv_hook=True) for _ in range(3)],
        "v1 low-latency weights in bf16": lambda: ll.low_latency_combine(
            torch.zeros(E // state.world_size, state.world_size * LL_TOKENS, D), ids, w.bfloat16(),
            ll.low_latency_dispatch(x, ids, LL_TOKENS, E, use_fp8=False)[2]),
    }
    refused = {}
    for name, call in cases.items():
        try:
            call()
            refused[name] = False
        except (AssertionError, RuntimeError):
            refused[name] = True
    dist.barrier()
    return refused


def schedule_errors(state) -> list[dict]:
    """Plain forward vs two interleaved micro-batches, a model on each adapter (hidden 128: V1's
    low-latency kernels take multiples of 128)."""
    cfg = dataclasses.replace(TINY, hidden_size=128)
    placement = default_placement(state, cfg)
    expert_ids = lambda layer: placement.rank_experts(state.rank, layer)  # noqa: E731
    gen = torch.Generator().manual_seed(state.rank)
    lens = [23, 5, 12 + state.rank]
    tables = [list(range(i * 10, i * 10 + 10)) for i in range(len(lens))]
    ids = torch.randint(0, 256, (sum(lens),), generator=gen)
    steps = [(PREFILL, ids, AttentionBatch.build(tables, [0] * 3, lens, 4)),
             (DECODE, torch.randint(0, 256, (3,), generator=gen), AttentionBatch.build(tables, lens, [1] * 3, 4))]
    errors = []
    for name, dispatcher in (("v1 auto", v1(state, placement, cfg.hidden_size, "auto", False)),
                             ("v2 auto", v2(state, placement, cfg.hidden_size, "auto", False,
                                            cfg.num_experts_per_tok))):
        model = build_model(cfg, dispatcher=dispatcher, expert_ids=expert_ids)
        caches = (fresh_cache(model), fresh_cache(model))
        for schedule, step_ids, batch in steps:
            with torch.inference_mode():
                dispatcher.begin_step(len(step_ids))
                plain = model(step_ids, batch, caches[0])
                dispatcher.begin_step(len(step_ids))  # micro-batches are smaller: keep the step's choice
                overlapped = forward_two_micro_batches(model, split_step(step_ids, batch), caches[1], schedule)
            errors.append({"adapter": name, "schedule": schedule.name,
                           "rel_err": float((plain - overlapped).abs().max() / plain.abs().max())})
    return errors


def main() -> int:
    join_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    state = ParallelState(rank, world, rank, world, rank, world, rank, E, torch.device("cpu"), "gloo", dist.group.WORLD)
    placement = ExpertPlacement.contiguous(1, E, 0, world)
    group = weakref.ref(state.group)
    report = {"moe": check_moe(state, placement), "hooks": hook_order(state, placement),
              "misuse_refused": misuse_refused(state, placement)}
    report["schedules"] = schedule_errors(dataclasses.replace(state, num_experts=TINY.n_routed_experts))
    dist.barrier()
    # The doubles and dispatchers hold the group (some in reference cycles): collect them before shutdown, or
    # gloo's threads are left to static destructors, which can abort a rank after it passed.
    gc.collect()
    shutdown(state)
    gc.collect()
    report["group_freed"] = group() is None
    (Path(sys.argv[1]) / f"rank{rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
