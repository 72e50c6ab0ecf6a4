"""Rank layout, placement maps, prompt balancing and the dry run, all in one process."""

import subprocess
import sys
import time

import pytest
import torch

from helpers.tiny import TINY
from moe_pd.config import ConfigError, ParallelConfig
from moe_pd.config.model import ModelConfig
from moe_pd.parallel.placement import ExpertPlacement
from moe_pd.parallel.state import validate_layout
from moe_pd.parallel.step_sync import balance_by_tokens
from moe_pd.parallel.watchdog import slowest_rank


@pytest.mark.parametrize("world, parallel, message", [
    (3, ParallelConfig(), "must be divisible by the EP size 3"),
    (32, ParallelConfig(), "more ranks than expert slots"),
    (2, ParallelConfig(ep_size=4), "must equal the world size 2"),
    (2, ParallelConfig(dispatcher="local"), "holds every expert on one rank"),
    (1, ParallelConfig(num_redundant_experts=4), "replicas need EP > 1"),
])
def test_invalid_layouts_fail_before_any_process_group(world, parallel, message):
    with pytest.raises(ConfigError, match=message):
        validate_layout(world, parallel, TINY)


def test_valid_layouts():
    assert validate_layout(4, ParallelConfig(), TINY) == 4
    assert validate_layout(144, ParallelConfig(num_redundant_experts=32), ModelConfig()) == 144


def test_contiguous_placement_with_replicas():
    p = ExpertPlacement.contiguous(num_layers=2, num_logical=8, num_redundant=4, num_ranks=4, first_layer=1)
    assert [p.rank_experts(r, 1) for r in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 0], [1, 2, 3]]
    assert p.logcnt_LE[0].tolist() == [2, 2, 2, 2, 1, 1, 1, 1]
    for layer in range(2):  # log2phy and phy2log are inverse
        for e in range(8):
            for x in p.log2phy_LEX[layer, e].tolist():
                assert x == -1 or p.phy2log_LP[layer, x] == e
    ids = torch.tensor([[0, 4, -1], [0, 1, 7]])
    phys = p.route(ids, layer=1)
    assert phys[0, 2] == -1
    assert all(p.phy2log_LP[0, s] == e for s, e in zip(phys.flatten().tolist(), ids.flatten().tolist()) if e >= 0)
    # expert 0 has replicas in slots 0 and 8: the two (token, k) pairs that pick it use both
    assert {phys[0, 0].item(), phys[1, 0].item()} == {0, 8}


def test_identity_placement_routes_unchanged():
    p = ExpertPlacement.contiguous(1, 16, 0, 4)
    ids = torch.tensor([[3, 15, -1, 0]])
    assert torch.equal(p.route(ids, 0), ids)


def test_balance_by_tokens():
    assert balance_by_tokens([10, 1, 1, 8, 2], 2) == [0, 0, 1, 1, 1]  # 11 tokens each
    owner = balance_by_tokens([5] * 7, 4)
    assert sorted(owner.count(r) for r in range(4)) == [1, 2, 2, 2]
    assert balance_by_tokens([3], 4) == [0]


def test_slowest_rank():
    assert slowest_rank({0: 10, 1: 9, 2: 10, 3: 10}) == 1
    assert slowest_rank({0: 4, 1: 4}) == 0


def test_dry_run_144_ranks_deepseek_v3():
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "moe_pd.dry_run", "model=deepseek_v3",
                           "parallel.dry_run_world_size=144", "parallel.num_redundant_experts=32",
                           "runtime.dtype=bfloat16"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 30
    lines = proc.stdout.splitlines()
    assert "288 (256 routed + 32 redundant replicas)" in proc.stdout
    assert "2 routed expert slots/layer" in proc.stdout
    rows = [line.split() for line in lines if line[:4].strip().isdigit()]
    assert len(rows) == 144 and rows[0][-1] == "0,1" and rows[-1][-1] == "30,31"


def test_dry_run_rejects_bad_layout():
    proc = subprocess.run([sys.executable, "-m", "moe_pd.dry_run", "model=deepseek_v3",
                           "parallel.dry_run_world_size=144"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "256 routed" not in proc.stdout
    assert "must be divisible by the EP size 144" in proc.stderr
