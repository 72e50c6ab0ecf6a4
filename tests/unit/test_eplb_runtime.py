"""EPLB at run time: recording without host syncs, replica routing, stats files, initial placement, replay."""

import subprocess
import sys

import pytest
import torch

from helpers.tiny import TINY
from moe_pd.config import ParallelConfig
from moe_pd.config.eplb import EplbConfig
from moe_pd.eplb.manager import initial_placement, plan_placement
from moe_pd.eplb.recorder import ExpertLoadRecorder, LoadStats, load_stats, save_stats
from moe_pd.parallel.placement import ExpertPlacement
from moe_pd.parallel.state import ParallelState


def test_recorder_window_is_a_ring():
    rec = ExpertLoadRecorder(num_layers=2, num_experts=4, window=2, first_layer=1)
    rec.begin_step()
    rec.record(1, torch.tensor([[0, 1], [0, -1]]))
    rec.record(2, torch.tensor([[3, 3]]))
    rec.record_received(1, 5)
    assert rec.window_load().tolist() == [[2, 1, 0, 0], [0, 0, 0, 2]]
    rec.begin_step()
    rec.record(1, torch.tensor([[2, 2]]))
    assert rec.window_load().tolist() == [[2, 1, 2, 0], [0, 0, 0, 2]]
    rec.begin_step()  # the first step falls out of the window
    assert rec.window_load().tolist() == [[0, 0, 2, 0], [0, 0, 0, 0]]
    assert rec.window_received().tolist() == [0, 0]


def test_stats_file_round_trip(tmp_path):
    stats = LoadStats(torch.arange(12).view(2, 6), {"model": "x", "n_group": 2}, torch.ones(4, 2, dtype=torch.int64),
                      torch.arange(36).view(3, 2, 6))
    save_stats(tmp_path / "s.safetensors", stats)
    back = load_stats(tmp_path / "s.safetensors")
    assert torch.equal(back.expert_load_LE, stats.expert_load_LE) and back.meta == stats.meta
    assert torch.equal(back.rank_recv_rows_RL, stats.rank_recv_rows_RL)
    assert torch.equal(back.load_history_TLE, stats.load_history_TLE)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_stats(tmp_path / "missing.safetensors")


def test_dynamic_routing_spreads_an_expert_evenly_over_its_replicas():
    p = ExpertPlacement.contiguous(1, 4, 4, 2)  # every expert has 2 replicas
    ids = torch.zeros(8, 1, dtype=torch.int64)  # all tokens to expert 0
    dynamic = p.route(ids, 0, dynamic=True, salt=1)
    assert sorted(dynamic.flatten().tolist()) == [0] * 4 + [4] * 4
    static = p.route(ids, 0)
    assert sorted(static.flatten().tolist()) == [0] * 4 + [4] * 4
    skewed = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1]])  # expert 0 always at k = 0
    assert sorted(p.route(skewed, 0, dynamic=True)[:, 0].tolist()) == [0, 0, 4, 4]
    assert p.route(skewed, 0)[:, 0].unique().numel() == 1  # static by flat position: all even -> same replica


def test_initial_placement_from_stats(tmp_path):
    load = torch.ones(TINY.num_moe_layers, TINY.n_routed_experts)
    load[:, 5] = 100  # expert 5 is hot: it should get the spare slots
    save_stats(tmp_path / "s.safetensors", LoadStats(load, {}))
    state = ParallelState(0, 4, 0, 4, 0, 4, 0, 24, torch.device("cpu"), "gloo")
    placement = initial_placement(EplbConfig(enabled=True, init_from=str(tmp_path / "s.safetensors")), state, TINY)
    assert placement.logcnt_LE[0, 5] > 1
    assert placement.num_slots == 24 and placement.first_layer == TINY.first_k_dense_replace
    bad = tmp_path / "bad.safetensors"
    save_stats(bad, LoadStats(torch.ones(7, 3), {}))
    with pytest.raises(ValueError, match="does not match"):
        initial_placement(EplbConfig(init_from=str(bad)), state, TINY)


def test_plan_is_deterministic():
    load = torch.randint(0, 100, (TINY.num_moe_layers, TINY.n_routed_experts))
    state = ParallelState(0, 4, 0, 4, 0, 4, 0, 32, torch.device("cpu"), "gloo")
    a = plan_placement(load, EplbConfig(), state, TINY)
    b = plan_placement(load, EplbConfig(), state, TINY)
    assert torch.equal(a.phy2log_LP, b.phy2log_LP)


def test_eplb_config_checks():
    from moe_pd.config import ConfigError

    with pytest.raises(ConfigError, match="eplb.rebalance_every"):
        EplbConfig(rebalance_every=5)
    with pytest.raises(ConfigError, match="eplb.routing"):
        EplbConfig(routing="random")
    assert ParallelConfig(num_redundant_experts=32).num_redundant_experts == 32


def test_replay_tool(tmp_path):
    gen = torch.Generator().manual_seed(0)
    load = (1000 / torch.arange(1, 65).float() ** 1.1)[torch.randperm(64, generator=gen)].expand(3, -1).round()
    save_stats(tmp_path / "s.safetensors", LoadStats(load.clone(), {"n_group": 8, "hidden_size": 128,
                                                                    "moe_intermediate_size": 64}))
    proc = subprocess.run([sys.executable, "-m", "moe_pd.eplb.replay", str(tmp_path / "s.safetensors"),
                           "--num-gpus", "8", "--num-redundant", "8", "--num-nodes", "2", "--per-layer"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "balancedness (mean over layers): none" in proc.stdout
    assert "planning time: deepseek" in proc.stdout and "weights move" in proc.stdout
    assert len([line for line in proc.stdout.splitlines() if line[:5].strip().isdigit()]) == 3
    bad = subprocess.run([sys.executable, "-m", "moe_pd.eplb.replay", str(tmp_path / "s.safetensors"),
                          "--num-gpus", "7", "--num-redundant", "8"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "divisible by num_gpus=7" in bad.stderr


def test_metrics_show_eplb_balancedness_rebalances_and_bytes():
    from prometheus_client import generate_latest

    from moe_pd.serve.metrics import Metrics

    metrics = Metrics()
    eplb = {"balancedness": {"window": [0.5, 0.75], "step": [0.25, 1.0]}, "rebalances": 3, "checks": 5,
            "bytes_moved": 4096}
    metrics.instance("decode@x:1", "decode", True, [], eplb)
    text = generate_latest(metrics.registry).decode()
    assert 'moe_pd_eplb_balancedness{instance="decode@x:1",layer="1",role="decode",scope="window"} 0.75' in text
    assert 'moe_pd_eplb_balancedness{instance="decode@x:1",layer="0",role="decode",scope="step"} 0.25' in text
    assert 'moe_pd_eplb_rebalances{instance="decode@x:1",role="decode"} 3.0' in text
    assert 'moe_pd_eplb_bytes_moved{instance="decode@x:1",role="decode"} 4096.0' in text
