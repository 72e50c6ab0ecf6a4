"""The trained tiny checkpoint the repository ships (moe_pd/assets/tiny_dsv3, docs/tiny_checkpoint.md): within
10 MB, DeepSeek-V3-shaped with an MTP layer, loaded by moe_pd and by transformers alike (logits and greedy
tokens equal), readable greedy text, measurable MTP acceptance with greedy speculation token-identical to
plain decoding, and routing statistics skewed the way a trained router's are."""

import json

import pytest
import torch

from helpers.spec_loop import spec_generate
from moe_pd.assets import TINY_DSV3
from moe_pd.config.hf import resolve_model_config
from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.config.model import ModelConfig
from moe_pd.config.sampling import SamplingConfig
from moe_pd.engine.offline import OfflineEngine
from moe_pd.engine.tokenizer import load_tokenizer
from moe_pd.eplb.recorder import load_stats
from moe_pd.model.loader import build_model

CFG = resolve_model_config(ModelConfig(path=str(TINY_DSV3)))
PROMPTS = ["The capital of France is", "Question: What is 3 + 4?\nAnswer:", "Once upon a time,",
           "user: What does a cow say?\nassistant:", "Monday, Tuesday,"]


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, mtp=True)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(CFG)


def greedy(model, prompts, n):
    engine = OfflineEngine(model, KVCacheConfig(block_size=16, num_blocks=256), max_batch_size=8)
    return [c.output_ids for c in engine.generate(prompts, SamplingConfig(max_new_tokens=n, ignore_eos=True))]


def test_files_shape_and_size():
    size = sum(f.stat().st_size for f in TINY_DSV3.iterdir() if f.name != "loss_curve.png")
    assert size <= 10 * 2**20, size
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        {f.name for f in TINY_DSV3.iterdir()}
    assert (CFG.architecture, CFG.scoring_func, CFG.topk_method) == ("DeepseekV3ForCausalLM", "sigmoid", "noaux_tc")
    assert CFG.q_lora_rank and CFG.n_shared_experts == 1 and CFG.n_routed_experts >= 16 and CFG.n_group > 1
    assert CFG.num_nextn_predict_layers == 1


def test_transformers_loads_it_with_the_same_logits_and_tokens(model, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(TINY_DSV3, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(TINY_DSV3)
    ids = tokenizer.encode(PROMPTS[2])
    assert hf_tok(PROMPTS[2]).input_ids == ids
    from helpers.runner import forward_logits

    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                          max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=1)
    got = forward_logits(model, [ids])[0]
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert greedy(model, [ids], 24)[0] == out[0, len(ids):].tolist()


def test_greedy_text_is_recognisable(model, tokenizer):
    texts = [tokenizer.decode(o) for o in greedy(model, [tokenizer.encode(p) for p in PROMPTS], 16)]
    assert texts[0].startswith(" Paris."), texts[0]
    assert texts[1].startswith(" 3 + 4 = 7."), texts[1]
    assert texts[2].startswith(" there was a"), texts[2]
    assert texts[3].startswith(" A cow says moo."), texts[3]
    assert texts[4].startswith(" Wednesday, Thursday"), texts[4]


def test_greedy_speculation_is_identical_and_accepts_drafts(model, tokenizer):
    """K = 2 over the paged cache: the same tokens as K = 0, and on this corpus the MTP's drafts are mostly
    right (mean tokens per step, i.e. the acceptance length, well above 1)."""
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    run = spec_generate(model, prompts, 2, 24, block_size=16)
    assert run.outputs == greedy(model, prompts, 24)
    steps = [a for step in run.accepted for a in step]
    assert 1 + sum(steps) / len(steps) >= 1.5


def test_routing_statistics_are_recorded_and_skewed():
    """The bias update balanced the router on its training mix (as DeepSeek-V3's does); windows of a workload
    whose mix drifts between kinds of request are skewed, each kind preferring its experts."""
    from safetensors import safe_open

    stats = load_stats(TINY_DSV3 / "expert_load.safetensors")
    total = stats.expert_load_LE.float()
    assert total.shape == (CFG.num_expert_layers, CFG.n_routed_experts)
    assert stats.meta["num_mtp_layers"] == 1 and (total > 0).all()
    with safe_open(str(TINY_DSV3 / "expert_load.safetensors"), "pt") as f:
        windows = f.get_tensor("expert_load_history").float()
    assert windows.shape == (24, *total.shape) and torch.equal(windows.sum(0) > 0, total > 0)
    mix_skew = total.max(1).values / total.mean(1)
    drift_skew = (windows.max(2).values / windows.mean(2)).mean(0)
    assert (mix_skew < 1.3).all() and (drift_skew > 1.3).all(), (mix_skew, drift_skew)
    report = json.loads((TINY_DSV3 / "training.json").read_text())["routing"]
    assert report["max_over_mean_per_layer"] == [round(v, 2) for v in mix_skew.tolist()]
