"""The nvshmem backend's calls against a double of nvshmem4py 0.4's API (tests/helpers/nvshmem_double.py):
one PE on CPU memory, its MoE output equal to the local backend's. The GPU run of the same backend is
tests/gpu/test_dispatch_gpu.py."""

import pytest
import torch

from helpers import nvshmem_double
from moe_pd.model.experts import grouped_swiglu
from moe_pd.parallel.dispatch.local import LocalDispatcher
from moe_pd.parallel.placement import ExpertPlacement
from moe_pd.parallel.state import ParallelState

E, K, D, F, T = 16, 4, 128, 32, 40


class _CurrentStream:
    cuda_stream = 0


@pytest.fixture
def nvshmem(monkeypatch):
    nvshmem_double.install(monkeypatch)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _CurrentStream())
    return nvshmem_double.STATE


def run(dispatcher, x, ids, w, w13, w2):
    routed = dispatcher.dispatch(x, ids, w, layer=0)
    return dispatcher.combine(grouped_swiglu(routed.x_ND, routed.counts_E, w13, w2), routed.handle)


def test_single_pe_matches_local(nvshmem):
    from moe_pd.parallel.dispatch.nvshmem import NvshmemDispatcher

    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g)
    ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K]
    ids[::7, -1] = -1
    w = torch.rand(T, K, generator=g)
    w13, w2 = torch.randn(E, 2 * F, D, generator=g) * 0.05, torch.randn(E, D, F, generator=g) * 0.05
    dispatcher = NvshmemDispatcher(ParallelState.single(E, "cuda:0"), D, ExpertPlacement.contiguous(1, E, 0, 1),
                                   top_k=K, capacity=T, dtype=torch.float32)
    for _ in range(2):  # the second step reuses the symmetric buffers
        torch.testing.assert_close(run(dispatcher, x, ids, w, w13, w2), run(LocalDispatcher(E), x, ids, w, w13, w2),
                                   rtol=1e-5, atol=1e-6)
    assert nvshmem.puts > 0
    dispatcher.close()
    assert not nvshmem.heap and not nvshmem.initialized


def test_put_of_a_slice_is_refused(nvshmem):
    """Why the backend puts cuda-core Buffer views: nvshmem4py resolves tensors to whole allocations."""
    nvshmem_double.init(nvshmem_double.Device(0), b"uid", 0, 1, initializer_method="uid")
    a, b = nvshmem_double.tensor((4, 8)), nvshmem_double.tensor((4, 8))
    with pytest.raises(nvshmem_double.NvshmemInvalid):
        nvshmem_double.put(a[1:2], b[1:2], remote_pe=0, stream=nvshmem_double.NvshmemStream(_CurrentStream()))
