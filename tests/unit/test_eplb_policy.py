"""EPLB policies: DeepSeek's published example, invariants as property tests, ours never worse."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_pd.eplb import rebalance_experts
from moe_pd.eplb.metrics import balancedness, gpu_loads

README_WEIGHT = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                              [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
README_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def test_deepseek_policy_reproduces_the_published_example():
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8, policy="deepseek")
    assert phy2log.tolist() == README_PHY2LOG


@st.composite
def problems(draw):
    gpus_per_node = draw(st.sampled_from([1, 2, 4]))
    nodes = draw(st.sampled_from([1, 2, 3]))
    gpus = gpus_per_node * nodes
    # groups that divide over the nodes (hierarchical policy) or not (global policy)
    groups = nodes * draw(st.sampled_from([1, 2])) if draw(st.booleans()) else draw(st.sampled_from([1, 3, 5]))
    experts = groups * draw(st.sampled_from([2, 4]))
    if experts % gpus:
        experts *= gpus
    slots_per_gpu = experts // gpus + draw(st.integers(0, 2))
    layers = draw(st.integers(1, 3))
    skew = draw(st.floats(0.0, 2.0))
    seed = draw(st.integers(0, 10_000))
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, experts + 1).float()
    weight = torch.stack([(1000 / ranks**skew)[torch.randperm(experts, generator=gen)] for _ in range(layers)])
    if draw(st.booleans()):
        weight[:, : experts // 2] = 0  # idle experts
    return weight.round(), slots_per_gpu * gpus, groups, nodes, gpus


@pytest.mark.parametrize("policy", ["deepseek", "ours"])
@settings(max_examples=60, deadline=None)
@given(problem=problems())
def test_invariants(policy, problem):
    weight, replicas, groups, nodes, gpus = problem
    phy2log, log2phy, logcnt = rebalance_experts(weight, replicas, groups, nodes, gpus, policy=policy)
    layers, experts = weight.shape
    assert phy2log.shape == (layers, replicas)
    assert (logcnt >= 1).all()  # every logical expert has a replica
    assert (logcnt.sum(-1) == replicas).all()
    for layer in range(layers):
        counts = torch.bincount(phy2log[layer], minlength=experts)
        assert torch.equal(counts, logcnt[layer])
        for e in range(experts):  # log2phy and phy2log are inverse
            slots = [p for p in log2phy[layer, e].tolist() if p >= 0]
            assert len(slots) == logcnt[layer, e]
            assert all(phy2log[layer, p] == e for p in slots)
        if groups % nodes == 0:  # hierarchical: each group's replicas stay inside one node
            slots_per_node, group_size = replicas // nodes, experts // groups
            node_of_slot = torch.arange(replicas) // slots_per_node
            for g in range(groups):
                in_group = (phy2log[layer] // group_size) == g
                assert node_of_slot[in_group].unique().numel() == 1
    # every GPU holds exactly replicas / gpus slots: by layout, slot p is on GPU p // (replicas / gpus)
    assert replicas % gpus == 0


@settings(max_examples=40, deadline=None)
@given(problem=problems())
def test_ours_never_worse_than_deepseek(problem):
    weight, replicas, groups, nodes, gpus = problem
    ds = rebalance_experts(weight, replicas, groups, nodes, gpus, policy="deepseek")
    ours = rebalance_experts(weight, replicas, groups, nodes, gpus, policy="ours")
    ds_peak = gpu_loads(weight, ds[0], ds[2], gpus).max(-1).values
    ours_peak = gpu_loads(weight, ours[0], ours[2], gpus).max(-1).values
    assert (ours_peak <= ds_peak + 1e-3).all()


def test_ours_better_on_skewed_loads_at_ep32():
    gen = torch.Generator().manual_seed(0)
    ranks = torch.arange(1, 257).float()
    weight = torch.stack([(1e6 / ranks)[torch.randperm(256, generator=gen)] for _ in range(8)]).round()
    ds = rebalance_experts(weight, 288, 8, 4, 32, policy="deepseek")
    ours = rebalance_experts(weight, 288, 8, 4, 32, policy="ours")
    b_ds = balancedness(gpu_loads(weight, ds[0], ds[2], 32)).mean()
    b_ours = balancedness(gpu_loads(weight, ours[0], ours[2], 32)).mean()
    assert b_ours > b_ds


@pytest.mark.parametrize("args, message", [
    ((16, 4, 2, 5), "divisible by num_gpus"),
    ((16, 4, 3, 8), "num_gpus=8 must be divisible by num_nodes=3"),
    ((8, 4, 2, 8), "must be >= the 12 logical experts"),
])
def test_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        rebalance_experts(README_WEIGHT, *args)


# --- history input and hysteresis (next_window.py) ---------------------------------------------------------

def _zipf(layers, experts, seed):
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, experts + 1).float()
    return torch.stack([(1e4 / ranks)[torch.randperm(experts, generator=gen)] for _ in range(layers)]).round()


def test_one_window_history_is_the_plain_call():
    weight = _zipf(3, 64, 0)
    plain = rebalance_experts(weight, 80, 8, 2, 8)
    for got, want in zip(rebalance_experts(weight[None], 80, 8, 2, 8), plain):
        assert torch.equal(got, want)
    history = torch.stack([_zipf(3, 64, 1), weight])
    ds = rebalance_experts(history, 80, 8, 2, 8, policy="deepseek")  # DeepSeek: the last window
    assert torch.equal(ds[0], rebalance_experts(weight, 80, 8, 2, 8, policy="deepseek")[0])


def test_history_beats_the_last_window_when_load_reverts():
    from moe_pd.eplb.drift import DriftSpec, drift_windows

    spec = DriftSpec("revert", zipf=0.6, sigma=0.3, reversion=0.5)
    windows = drift_windows(spec, 14, 6, 64, seed=1).float()
    ours, ds = [], []
    for t in range(7, 13):  # two slots per GPU, as DeepSeek's decode (EP 144, 288 slots)
        nxt = windows[t + 1]
        for out, plan in ((ours, rebalance_experts(windows[t - 7:t + 1], 72, 1, 1, 36)),
                          (ds, rebalance_experts(windows[t], 72, 1, 1, 36, policy="deepseek"))):
            out.append(balancedness(gpu_loads(nxt, plan[0], plan[2], 36)).mean())
    gain = torch.stack(ours).mean() / torch.stack(ds).mean()
    assert gain > 1.02, gain  # the forecast (an average of past windows) is worth more than a point


def test_hysteresis_keeps_the_current_placement_and_moves_nothing():
    from moe_pd.eplb.next_window import fetched_slots

    history = torch.stack([_zipf(2, 64, s) for s in range(4)])
    current = rebalance_experts(history[:1], 80, 1, 1, 8)[0]
    kept = rebalance_experts(history, 80, 1, 1, 8, current=current, min_gain=1.0)[0]
    assert torch.equal(kept, current)  # no plan can gain a whole point of balancedness
    costly = rebalance_experts(history, 80, 1, 1, 8, current=current, move_cost=1e6)[0]
    assert torch.equal(costly, current)
    free = rebalance_experts(history, 80, 1, 1, 8, current=current)[0]
    assert not torch.equal(free, current)  # the load changed, so a free move is taken
    fresh = rebalance_experts(history, 80, 1, 1, 8)[0]
    for layer in range(2):  # aligned to the current labels: fewer fetches than the fresh plan's labels
        aligned = fetched_slots(current[layer].numpy(), free[layer].numpy(), 8, 64)
        assert aligned <= fetched_slots(current[layer].numpy(), fresh[layer].numpy(), 8, 64)


def test_alignment_undoes_a_relabelling():
    from moe_pd.eplb.next_window import align, fetched_slots

    row = rebalance_experts(_zipf(1, 64, 5), 96, 8, 4, 16)[0][0].numpy()
    gpus = row.reshape(16, 6)
    # swap nodes 0 and 2, reverse the GPUs inside every node, rotate the slots of every GPU
    perm = np.concatenate([np.arange(8, 12), np.arange(4, 8), np.arange(0, 4), np.arange(12, 16)])
    shuffled = np.roll(gpus[perm].reshape(4, 4, 6)[:, ::-1].reshape(16, 6), 1, axis=1).reshape(-1)
    assert fetched_slots(row, shuffled, 16, 64) > 0
    assert np.array_equal(align(row, shuffled, 16, 4, 64), row)


def test_history_shape_is_checked():
    with pytest.raises(ValueError, match="weight must be"):
        rebalance_experts(torch.ones(64), 80, 1, 1, 8)
    with pytest.raises(ValueError, match="current placement"):
        rebalance_experts(torch.ones(2, 64), 80, 1, 1, 8, current=torch.zeros(3, 80, dtype=torch.int64))
