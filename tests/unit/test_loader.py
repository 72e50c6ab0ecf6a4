"""Checkpoint loading: FP8 block dequantisation, clear errors, MTP skipping, expert subsets, sharding."""

import json
import logging
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.runner import forward_logits
from helpers.tiny import TINY
from moe_pd.config.hf import resolve_model_config
from moe_pd.config.model import ModelConfig
from moe_pd.model.fp8 import FP8_DTYPE, quantize_block_fp8
from moe_pd.model.loader import CheckpointError, RandomSource, SafetensorsSource, build_model
from moe_pd.parallel.dispatch import LocalDispatcher

PROMPTS = [[0, 3, 9, 27, 81, 1, 2, 5]]
QUANTISED = re.compile(r".*(proj|experts\.\d+\.\w+_proj)\.weight$")


def load(path, **kw):
    return build_model(resolve_model_config(ModelConfig(path=str(path))), **kw)


def copy_ckpt(hf_checkpoints, tmp_path, name="v3_lora_groups_yarn"):
    dst = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoints[name][1], dst)
    return dst, load_file(dst / "model.safetensors")


def dequant_by_hand(q, scale_inv, block):
    out = torch.empty(q.shape)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = q[rows, cols].float() * scale_inv[i, j]
    return out


def test_fp8_block_scaled_checkpoint(hf_checkpoints, tmp_path):
    """Weights stored as DeepSeek stores them (e4m3 + weight_scale_inv per 16x16 block here, so that the
    tiny matrices span several blocks) load to exactly the dequantised reference."""
    path, tensors = copy_ckpt(hf_checkpoints, tmp_path)
    block = 16
    fp8, reference = {}, {}
    for name, w in tensors.items():
        if QUANTISED.match(name):
            q, s = quantize_block_fp8(w, (block, block))
            fp8[name], fp8[name.replace(".weight", ".weight_scale_inv")] = q, s
            reference[name] = dequant_by_hand(q, s, block)
        else:
            fp8[name] = reference[name] = w
    assert any(t.dtype == FP8_DTYPE for t in fp8.values())
    save_file(fp8, path / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [block, block]}
    (path / "config.json").write_text(json.dumps(cfg))
    ref_path = tmp_path / "ref"
    shutil.copytree(path, ref_path)
    save_file(reference, ref_path / "model.safetensors")

    got = forward_logits(load(path), PROMPTS)[0]
    want = forward_logits(load(ref_path), PROMPTS)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    original = forward_logits(load(hf_checkpoints["v3_lora_groups_yarn"][1]), PROMPTS)[0]
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), original.flatten(), dim=0)
    assert cosine > 0.9, cosine  # fp8 rounding, not garbage


def test_missing_tensor_is_named(hf_checkpoints, tmp_path):
    path, tensors = copy_ckpt(hf_checkpoints, tmp_path)
    del tensors["model.layers.1.self_attn.kv_a_layernorm.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.kv_a_layernorm\.weight.*missing"):
        load(path)


def test_wrong_shape_names_tensor_and_file(hf_checkpoints, tmp_path):
    path, tensors = copy_ckpt(hf_checkpoints, tmp_path)
    tensors["model.layers.2.mlp.experts.3.up_proj.weight"] = torch.zeros(5, 5)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"experts\.3\.up_proj\.weight.*model\.safetensors.*\(5, 5\)"):
        load(path)


def test_mtp_layers_skipped_with_a_message(hf_checkpoints, tmp_path, caplog):
    path, tensors = copy_ckpt(hf_checkpoints, tmp_path)
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    tensors["model.layers.3.enorm.weight"] = torch.zeros(64)
    save_file(tensors, path / "model.safetensors")
    with caplog.at_level(logging.INFO, logger="moe_pd.model.loader"):
        load(path)
    assert "skipping 2 tensors of layers [3]" in caplog.text


class RecordingSource:
    def __init__(self, inner):
        self.inner, self.read = inner, []

    def names(self):
        return self.inner.names()

    def get(self, name, shape):
        self.read.append(name)
        return self.inner.get(name, shape)


@pytest.mark.parametrize("random_weights", [True, False])
def test_expert_subset_reads_only_its_experts(hf_checkpoints, random_weights):
    hf_path = str(hf_checkpoints["v3_lora_groups_yarn"][1])
    cfg = TINY if random_weights else resolve_model_config(ModelConfig(path=hf_path))
    inner = RandomSource(cfg.init_seed, cfg.init_std) if random_weights else SafetensorsSource(cfg.path)
    full = build_model(cfg, source=inner)
    recorder = RecordingSource(inner)
    subset = build_model(cfg, expert_ids=[1, 5, 9], dispatcher=LocalDispatcher(3), source=recorder)
    experts_read = {int(m.group(1)) for n in recorder.read if (m := re.search(r"experts\.(\d+)\.", n))}
    assert experts_read == {1, 5, 9}
    for layer_full, layer_sub in zip(full.model.layers[1:], subset.model.layers[1:]):
        assert layer_sub.mlp.experts.expert_ids == [1, 5, 9]
        torch.testing.assert_close(layer_sub.mlp.experts.gate_up_proj, layer_full.mlp.experts.gate_up_proj[[1, 5, 9]])
        torch.testing.assert_close(layer_sub.mlp.experts.down_proj, layer_full.mlp.experts.down_proj[[1, 5, 9]])


def test_sharded_checkpoint_with_index(hf_checkpoints, tmp_path):
    hf_model, path = hf_checkpoints["v2_lora_grouped_plain"]
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(forward_logits(load(tmp_path / "sharded"), PROMPTS)[0],
                               forward_logits(load(path), PROMPTS)[0], rtol=0, atol=0)


def test_random_weights_are_reproducible():
    a, b = build_model(TINY), build_model(TINY)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert a.model.layers[0].self_attn.q_a_proj.weight.std() == pytest.approx(TINY.init_std, rel=0.1)


def test_save_checkpoint_round_trip(tmp_path):
    from moe_pd.model.loader import save_checkpoint

    model = build_model(TINY)
    save_checkpoint(model, tmp_path / "ckpt")
    again = load(tmp_path / "ckpt")
    torch.testing.assert_close(forward_logits(again, PROMPTS)[0], forward_logits(model, PROMPTS)[0], rtol=0, atol=0)
