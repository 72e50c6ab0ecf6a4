"""GPU dispatchers on one device: nvshmem with a single PE, all_to_all on an NCCL world of one.
Skipped without CUDA, and the nvshmem test where nvshmem4py cannot initialise."""

import os

import pytest
import torch

from moe_pd.model.experts import grouped_swiglu
from moe_pd.parallel.dispatch.local import LocalDispatcher
from moe_pd.parallel.placement import ExpertPlacement
from moe_pd.parallel.state import ParallelState, join_process_group

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
E, K, D, F, T = 16, 4, 256, 64, 100


def data():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, D, device="cuda", generator=g)
    ids = torch.rand(T, E, device="cuda", generator=g).argsort(dim=1)[:, :K]
    ids[::7, -1] = -1
    w = torch.rand(T, K, device="cuda", generator=g)
    w13 = torch.randn(E, 2 * F, D, device="cuda", generator=g) * 0.05
    w2 = torch.randn(E, D, F, device="cuda", generator=g) * 0.05
    return x, ids, w, w13, w2


def run(dispatcher, x, ids, w, w13, w2):
    routed = dispatcher.dispatch(x, ids, w, layer=0)
    y = grouped_swiglu(routed.x_ND, routed.counts_E.tolist(), w13, w2)
    return dispatcher.combine(y, routed.handle)


def test_nvshmem_single_pe_matches_local():
    try:
        from moe_pd.parallel.dispatch.nvshmem import NvshmemDispatcher

        state = ParallelState.single(E, "cuda:0")
        dispatcher = NvshmemDispatcher(state, D, ExpertPlacement.contiguous(1, E, 0, 1), top_k=K, capacity=T,
                                       dtype=torch.float32)
    except Exception as exc:  # no nvshmem4py, or it cannot initialise on this machine
        pytest.skip(f"nvshmem unavailable: {exc}")
    try:
        x, ids, w, w13, w2 = data()
        torch.testing.assert_close(run(dispatcher, x, ids, w, w13, w2), run(LocalDispatcher(E), x, ids, w, w13, w2),
                                   rtol=1e-5, atol=1e-5)
    finally:
        dispatcher.close()


def test_all_to_all_on_nccl_world_of_one():
    import torch.distributed as dist

    from moe_pd.parallel.dispatch.all_to_all import AllToAllDispatcher

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    join_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    try:
        state = ParallelState(0, 1, 0, 1, 0, 1, 0, E, torch.device("cuda:0"), "nccl", dist.group.WORLD)
        x, ids, w, w13, w2 = data()
        got = run(AllToAllDispatcher(state, D, ExpertPlacement.contiguous(1, E, 0, 1)), x, ids, w, w13, w2)
        torch.testing.assert_close(got, run(LocalDispatcher(E), x, ids, w, w13, w2), rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()
