"""Run-time routing among replicas: water-filling shares, each rank's split, the dispatcher hook."""

import torch

from moe_pd.eplb.replica_routing import ReplicaRouter, assign_replicas, gpu_loads_routed, replica_shares
from moe_pd.parallel.placement import ExpertPlacement


def test_water_filling_levels_gpus_through_a_replicated_expert():
    # 2 GPUs x 2 slots: GPU 0 = [expert 0, expert 2], GPU 1 = [expert 1, expert 2]; expert 2 is replicated
    p = ExpertPlacement.from_phy2log(torch.tensor([[0, 2, 1, 2]]), 3, 2)
    counts = torch.tensor([[100.0, 20.0, 100.0]])
    shares = replica_shares(counts, p.phy2log_LP, p.log2phy_LEX, 2)
    assert torch.allclose(shares, torch.tensor([[100.0, 10.0, 20.0, 90.0]]), atol=0.5)  # 110 | 110
    even = torch.tensor([[100.0, 50.0, 20.0, 50.0]])  # the even split leaves 150 | 70
    assert shares[0, [1, 3]].sum() == 100  # never changes how many tokens an expert gets
    loads = gpu_loads_routed(counts, p.phy2log_LP, p.log2phy_LEX, 2)
    assert loads.max() < even.view(1, 2, 2).sum(-1).max() - 30


def test_water_filling_cannot_move_load_it_does_not_hold():
    # expert 0 is hot and alone on GPU 0: no replica can take its load
    p = ExpertPlacement.from_phy2log(torch.tensor([[0, 1, 2, 1]]), 3, 2)
    loads = gpu_loads_routed(torch.tensor([[500.0, 60.0, 10.0]]), p.phy2log_LP, p.log2phy_LEX, 2)
    assert torch.allclose(loads, torch.tensor([[500.0, 70.0]]), atol=0.5)  # expert 1 (nearly) all on GPU 1


def test_each_rank_follows_the_shares_within_a_token():
    p = ExpertPlacement.from_phy2log(torch.tensor([[0, 1, 0, 2, 0, 3]]), 4, 3)  # expert 0 on all 3 GPUs
    share = torch.tensor([60.0, 5.0, 30.0, 5.0, 10.0, 5.0])
    ids = torch.zeros(25, 4, dtype=torch.int64)
    ids[:, 1:] = -1
    for salt in range(3):
        phys = assign_replicas(ids, share, p.log2phy_LEX[0], salt)
        got = torch.bincount(phys[:, 0], minlength=6)[[0, 2, 4]].float()
        assert (got - 25 * torch.tensor([0.6, 0.3, 0.1])).abs().max() <= 1
        assert (phys[:, 1:] == -1).all()
    assert torch.equal(assign_replicas(ids, share, p.log2phy_LEX[0], 1), assign_replicas(ids, share,
                                                                                         p.log2phy_LEX[0], 1))


def test_router_on_one_rank_routes_every_token_to_a_replica_of_its_expert():
    p = ExpertPlacement.contiguous(2, 8, 8, 4, first_layer=1)  # every expert twice
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8, (64, 2), generator=gen)
    ids[0, 1] = -1
    phys = ReplicaRouter().route(ids, p, layer=2)
    assert phys[0, 1] == -1
    valid = ids >= 0
    assert torch.equal(p.phy2log_LP[1][phys[valid]], ids[valid])
    assert torch.bincount(phys[valid], minlength=16).float().std() < 3  # spread, not one replica each


def test_routing_never_raises_the_peak_when_many_replicated_experts_share_gpus():
    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        perm = torch.randperm(32, generator=gen) % 16  # 16 experts twice each, 8 slots on each of 4 GPUs
        p = ExpertPlacement.from_phy2log(perm[None], 16, 4)
        counts = (torch.rand(1, 16, generator=gen) ** 3 * 1000).round()
        routed = gpu_loads_routed(counts, p.phy2log_LP, p.log2phy_LEX, 4)
        even = (counts / p.logcnt_LE).gather(1, p.phy2log_LP).view(1, 4, 8).sum(-1)
        assert routed.max() <= even.max() + 1e-3
        assert torch.isclose(routed.sum(), counts.sum())
