"""torchrun worker: every dispatcher backend against the local backend and an all-reduce reference MoE.

Each rank draws its own tokens and routing; all ranks share the global expert weights. For each backend and
case it records how far the EP output for this rank's tokens is from
- the local backend holding all experts, on this rank's tokens;
- the all-reduce MoE: every rank computes its experts over every rank's tokens, then all_reduce.
It writes OUT_DIR/rank<r>.json (OUT_DIR: the first argument); tests/dist/test_dispatch.py asserts on it.
The DeepEP adapters are checked against their doubles with these cases by deepep_worker.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from moe_pd.model.experts import grouped_swiglu
from moe_pd.parallel.dispatch.all_to_all import AllToAllDispatcher, pack_fp8, unpack_fp8
from moe_pd.parallel.dispatch.local import LocalDispatcher
from moe_pd.parallel.placement import ExpertPlacement
from moe_pd.parallel.state import ParallelState, join_process_group

E, K, D, F = 16, 4, 128, 32


def make_case(name: str, rank: int, world: int, gen: torch.Generator):
    tokens = {"uneven": 5 + 3 * rank, "one_expert": 7, "zero_tokens": 0 if rank == world - 1 else 9,
              "minus_one": 6, "odd_t": 2 * world + 1}[name]
    x = torch.randn(tokens, D, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(tokens)]) if tokens else \
        torch.zeros(0, K, dtype=torch.int64)
    if name == "uneven":  # most tokens pile onto rank 0's experts
        ids[: tokens // 2] = torch.tensor([0, 1, 2, 3])[:K]
    if name == "one_expert":
        ids[:, 0] = 5
        ids[:, 1:] = -1
    if name == "minus_one" and tokens:
        ids[::2, -1] = -1
        ids[1, :] = -1
    w = torch.rand(tokens, K, generator=gen)
    return x, ids, w


def moe(dispatcher, x, ids, w, w13, w2):
    most = torch.tensor([x.shape[0]])
    dist.all_reduce(most, op=dist.ReduceOp.MAX)  # every rank must choose the same exchange
    dispatcher.begin_step(int(most))
    routed = dispatcher.dispatch(x, ids, w, layer=0)
    return dispatcher.combine(grouped_swiglu(routed.x_ND, routed.counts_E.tolist(), w13, w2), routed.handle)


def all_reduce_reference(x, ids, w, w13, w2, local_experts, world):
    sizes = [None] * world
    dist.all_gather_object(sizes, (x, ids, w))
    parts = []
    for xs, idss, ws in sizes:
        out = torch.zeros_like(xs)
        for e in local_experts:
            tok, k = (idss == e).nonzero(as_tuple=True)
            if tok.numel():
                y = grouped_swiglu(xs[tok], [tok.numel()], w13[e : e + 1], w2[e : e + 1])
                out.index_add_(0, tok, y * ws[tok, k, None])
        parts.append(out)
    for p in parts:
        dist.all_reduce(p)
    return parts[dist.get_rank()]


def compare_with_references(name, ep, fp8, w13, w2, mine, rank, world, moe=moe) -> list[dict]:
    """The MoE output through dispatcher `ep` (this rank's experts `mine`) on every case, against the
    one-process dispatcher and the all-reduce reference: one result row per case and reference."""
    results = []
    for case in ("uneven", "one_expert", "zero_tokens", "minus_one", "odd_t"):
        x, ids, w = make_case(case, rank, world, torch.Generator().manual_seed(100 + rank))
        if fp8:  # the references see what the wire carries
            x = unpack_fp8(pack_fp8(x), D, x.dtype)
        got = moe(ep, x, ids, w, w13[mine], w2[mine])
        local = moe(LocalDispatcher(E), x, ids, w, w13, w2)
        reduced = all_reduce_reference(x, ids, w, w13, w2, mine, world)
        for ref_name, ref in (("local", local), ("all-reduce", reduced)):
            same_shape = got.shape == ref.shape
            results.append({"backend": name, "case": case, "reference": ref_name, "tokens": int(x.shape[0]),
                            "shape_matches": same_shape,
                            "close": same_shape and torch.allclose(got, ref, rtol=1e-5, atol=1e-6),
                            "max_abs_err": (got - ref).abs().max().item() if same_shape and got.numel() else 0.0})
    return results


def main() -> int:
    join_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    state = ParallelState(rank, world, rank, world, rank, world, rank, E, torch.device("cpu"), "gloo", dist.group.WORLD)
    g = torch.Generator().manual_seed(1234)
    w13, w2 = torch.randn(E, 2 * F, D, generator=g) * 0.1, torch.randn(E, D, F, generator=g) * 0.1
    mine = list(range(rank * E // world, (rank + 1) * E // world))
    results = []
    placement = ExpertPlacement.contiguous(1, E, 0, world)
    backends = []
    for fp8 in (False, True):
        backends.append((f"all_to_all fp8={fp8}", fp8, AllToAllDispatcher(state, D, placement, fp8=fp8)))
        backends.append((f"all_to_all padded fp8={fp8}", fp8,
                         AllToAllDispatcher(state, D, placement, fp8=fp8, padded_max_tokens=1 << 20)))
    for name, fp8, ep in backends:
        results += compare_with_references(name, ep, fp8, w13, w2, mine, rank, world)
    dist.barrier()
    dist.destroy_process_group()
    (Path(sys.argv[1]) / f"rank{rank}.json").write_text(json.dumps({"results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
