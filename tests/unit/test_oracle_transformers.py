"""moe_pd against transformers' DeepseekV3/V2ForCausalLM on the same saved weights (the oracle)."""

import pytest
import torch

from helpers.hf_models import V2_CONFIGS, V3_CONFIGS
from helpers.runner import forward_logits, greedy_reforward
from moe_pd.config.hf import resolve_model_config
from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.config.model import ModelConfig
from moe_pd.config.sampling import SamplingConfig
from moe_pd.engine.offline import OfflineEngine
from moe_pd.model.loader import build_model

ALL = [*V3_CONFIGS, *V2_CONFIGS]
PROMPTS = [[0, 5, 17, 99, 3, 42, 7], [0, 11], [0, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 2]]


def load_ours(path):
    return build_model(resolve_model_config(ModelConfig(path=str(path))))


def hf_greedy(model, prompt, n):
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=model.config.vocab_size - 1)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ALL)
def test_logits_match(hf_checkpoints, name):
    hf_model, path = hf_checkpoints[name]
    ours = load_ours(path)
    for prompt, logits in zip(PROMPTS, forward_logits(ours, PROMPTS)):
        with torch.no_grad():
            ref = hf_model(torch.tensor([prompt])).logits[0]
        assert (logits - ref).abs().max() <= 1e-4 * ref.abs().max(), name


@pytest.mark.parametrize("name", ALL)
def test_greedy_32_tokens_identical(hf_checkpoints, name):
    hf_model, path = hf_checkpoints[name]
    ours = load_ours(path)
    engine = OfflineEngine(ours, KVCacheConfig(block_size=4, num_blocks=128), max_batch_size=8)
    paged = engine.generate(PROMPTS, SamplingConfig(max_new_tokens=32, ignore_eos=True))
    for prompt, completion in zip(PROMPTS, paged):
        expected = hf_greedy(hf_model, prompt, 32)
        assert completion.output_ids == expected, name
        assert greedy_reforward(ours, prompt, 32) == expected, name


def test_v3_logits_differ_without_correction_bias(hf_checkpoints):
    """The oracle test can fail: zeroing the correction bias in ours changes the logits."""
    hf_model, path = hf_checkpoints["v3_lora_groups_yarn"]
    ours = load_ours(path)
    for layer in ours.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias.zero_()
    logits = forward_logits(ours, PROMPTS[:1])[0]
    with torch.no_grad():
        ref = hf_model(torch.tensor([PROMPTS[0]])).logits[0]
    assert (logits - ref).abs().max() > 1e-3 * ref.abs().max()
