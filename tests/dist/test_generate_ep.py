"""torchrun generation with EP = R and DP attention is token-identical to the single-process run."""

import json

import pytest
from hydra import compose, initialize_config_module

from helpers.torchrun import torchrun
from moe_pd.config.store import to_config
from moe_pd.generate import run

PROMPTS = '["Hello, moe_pd", "a", "DeepSeek-V3 serves with PD disaggregation", "xyz xyz", "0123456789"]'
COMMON = [f"prompts={PROMPTS}", "sampling.max_new_tokens=12", "sampling.ignore_eos=true", "runtime.log_level=WARNING"]


def single_process(overrides):
    with initialize_config_module("moe_pd.conf", version_base=None):
        return [r["output_ids"] for r in run(to_config(compose("generate", overrides=overrides)))]


def multi_rank(ranks, overrides, stderr_must_contain=""):
    proc = torchrun(ranks, ["-m", "moe_pd.generate", *overrides], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert stderr_must_contain in proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["index"] for r in records] == list(range(len(records)))
    return [r["output_ids"] for r in records]


@pytest.mark.dist
@pytest.mark.parametrize("ranks, extra", [
    (2, []),
    (4, ["parallel.num_redundant_experts=16"]),  # replicas route by (token, k): same tokens
    (4, ["sampling.temperature=0.9", "sampling.top_p=0.9", "sampling.seed=3"]),
])
def test_tiny_model(ranks, extra):
    ref = single_process([o for o in COMMON + extra if "redundant" not in o])
    assert len(ref) == 5 and all(len(r) == 12 for r in ref)
    assert multi_rank(ranks, COMMON + extra) == ref


FP8 = ["model.hidden_size=128", "model.moe_intermediate_size=128", "runtime.fp8_experts=true"]  # widths in 128s


@pytest.mark.dist
@pytest.mark.parametrize("eplb, log_line, model", [
    (["eplb=record"], "", []),  # static replica choice, load recorded
    (["eplb=record", "eplb.routing=dynamic"], "", []),
    (["eplb=record", "eplb.routing=balanced"], "", []),  # replicas chosen from the group's gate counts
    # weights move mid-run, one layer per step (eplb=online routes with routing=balanced)
    (["eplb=online", "eplb.rebalance_every=3", "eplb.min_gain=0", "eplb.move_cost=0", "eplb.layers_per_step=1"],
     "layers to go", []),
    (["eplb=online", "eplb.rebalance_every=3", "eplb.min_gain=0", "eplb.move_cost=0"], "switched placement",
     FP8),  # + block scales
])
def test_eplb_keeps_tokens_identical(eplb, log_line, model, tmp_path):
    ref = single_process(COMMON + model)
    overrides = [*COMMON, *model, "parallel.num_redundant_experts=16", *eplb,
                 f"eplb.dump_stats={tmp_path}/stats.safetensors", "runtime.log_level=INFO"]
    assert multi_rank(4, overrides, stderr_must_contain=log_line) == ref
    assert (tmp_path / "stats.safetensors").is_file()


@pytest.mark.dist
@pytest.mark.parametrize("ranks", [2, 4])
def test_transformers_checkpoint(hf_checkpoints, ranks):
    _, path = hf_checkpoints["v3_lora_groups_yarn"]
    overrides = ["model=path", f"model.path={path}", "prompt_ids=[[0,5,6,7],[0,9],[0,1,2,3,4,5,6,7,8,9,10]]",
                 "sampling.max_new_tokens=16", "sampling.ignore_eos=true", "runtime.log_level=WARNING"]
    assert multi_rank(ranks, overrides) == single_process(overrides)


@pytest.mark.dist
def test_bad_layout_fails_before_rendezvous():
    proc = torchrun(3, ["-m", "moe_pd.generate", "prompts=[hi]", "runtime.log_level=WARNING"], timeout=120)
    assert proc.returncode != 0
    assert "must be divisible by the EP size 3" in proc.stderr
