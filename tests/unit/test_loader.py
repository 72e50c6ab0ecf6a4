"""Checkpoint loading: FP8 block dequantisation, clear errors, MTP skipping, expert subsets, sharding."""

import json
import logging
import re
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.runner import forward_logits
from helpers.tiny import TINY
from moe_pd.config.hf import resolve_model_config
from moe_pd.config.model import ModelConfig
from moe_pd.fp8 import FP8_DTYPE, quantize_block_fp8
from moe_pd.model.loader import CheckpointError, RandomSource, SafetensorsSource, build_model, save_checkpoint
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


def quantize_pow2_blocks(w):
    """128x128 blocks with power-of-two scales (UE8M0, as DeepGEMM takes them and DeepSeek-V3.1 stores them):
    a block's amax lands anywhere in (224, 448], so requantising the dequantised weight changes its bytes."""
    blocks = w.float().view(w.shape[0] // 128, 128, w.shape[1] // 128, 128)
    scale = torch.exp2(torch.ceil(torch.log2(blocks.abs().amax(dim=(1, 3)) / torch.finfo(FP8_DTYPE).max)))
    return (blocks / scale[:, None, :, None]).to(FP8_DTYPE).view(w.shape), scale


def bits(t):
    return t.view(torch.uint8)


def test_fp8_experts_keep_a_checkpoints_blocks_bit_for_bit(tmp_path):
    """Routed experts stored in FP8 load into FP8 experts byte for byte with their scales (no dequantise and
    requantise round trip); without runtime.fp8_experts they load as the dequantised blocks. save_checkpoint
    writes FP8 experts back in the same format."""
    cfg = replace(TINY, hidden_size=128, moe_intermediate_size=128)  # FP8 blocks need widths in 128s
    path = save_checkpoint(build_model(cfg), tmp_path / "ckpt")  # fp32, then its experts rewritten in FP8
    # full-precision experts are quantised on load, as the random source's are
    quantised, reference = load(path, fp8_experts=True), build_model(cfg, fp8_experts=True)
    layer = cfg.first_k_dense_replace
    for name in ("gate_up_proj", "down_proj", "gate_up_scale", "down_scale"):
        got, want = (getattr(m.model.layers[layer].mlp.experts, name) for m in (quantised, reference))
        assert torch.equal(bits(got), bits(want)), name
    tensors = load_file(path / "model.safetensors")
    stored = {}
    for name in [n for n in tensors if re.search(r"experts\.\d+\.\w+_proj\.weight$", n)]:
        q, scale = quantize_pow2_blocks(tensors[name])
        tensors[name], tensors[name.replace(".weight", ".weight_scale_inv")] = q, scale
        stored[name] = (q, scale)
    save_file(tensors, path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(config))

    fp8_model, dense_model = load(path, fp8_experts=True), load(path)
    layers = range(cfg.first_k_dense_replace, cfg.num_hidden_layers)
    for layer in layers:
        experts, dense = fp8_model.model.layers[layer].mlp.experts, dense_model.model.layers[layer].mlp.experts
        for slot, gid in enumerate(experts.expert_ids):
            prefix = f"model.layers.{layer}.mlp.experts.{gid}"
            gate, up, down = (stored[f"{prefix}.{kind}_proj.weight"] for kind in ("gate", "up", "down"))
            assert torch.equal(bits(experts.gate_up_proj[slot]), bits(torch.cat([gate[0], up[0]])))
            assert torch.equal(bits(experts.down_proj[slot]), bits(down[0]))
            assert torch.equal(experts.gate_up_scale[slot], torch.cat([gate[1], up[1]]))
            assert torch.equal(experts.down_scale[slot], down[1])
            assert torch.equal(dense.down_proj[slot], dequant_by_hand(*down, 128))
    assert (fp8_model.model.layers[layers[0]].mlp.experts.gate_up_proj.float().abs().amax(dim=(1, 2)) < 448).any()

    again = save_checkpoint(fp8_model, tmp_path / "again")
    written = load_file(again / "model.safetensors")
    for name, (q, scale) in stored.items():
        assert torch.equal(bits(written[name]), bits(q))
        assert torch.equal(written[name.replace(".weight", ".weight_scale_inv")], scale)
    assert json.loads((again / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]


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
