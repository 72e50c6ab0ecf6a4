"""The MTP layer: loaded from DeepSeek-V3's checkpoint layout (bf16 and FP8 block-quantised) and checked against
the reference MTP of the technical report around transformers' decoder layer (helpers/mtp_reference.py);
its experts placed, recorded and moved like every MoE layer's."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.mtp_reference import ReferenceMTP, make_mtp_checkpoint
from helpers.runner import mtp_logits
from helpers.tiny import TINY
from moe_pd.config.eplb import EplbConfig
from moe_pd.config.hf import resolve_model_config
from moe_pd.config.model import ModelConfig
from moe_pd.eplb.manager import make_eplb_manager
from moe_pd.fp8 import dequantize_block_fp8, quantize_block_fp8
from moe_pd.kvcache.paged import AttentionBatch, PagedLatentCache
from moe_pd.model.loader import CheckpointError, build_model, save_checkpoint
from moe_pd.parallel.dispatch import LocalDispatcher
from moe_pd.parallel.state import ParallelState, default_placement

PROMPT = [0, 5, 17, 99, 3, 42, 7, 7, 64, 65, 66, 11, 2]


@pytest.fixture(scope="module")
def mtp_ckpt(tmp_path_factory):
    return make_mtp_checkpoint(tmp_path_factory.mktemp("mtp") / "ckpt")


def load(path, **kw):
    return build_model(resolve_model_config(ModelConfig(path=str(path))), mtp=True, **kw)


def test_the_reference_block_runs_as_inside_transformers(mtp_ckpt):
    """The oracle's pieces: the N + 1-layer model run with N layers is the N-layer checkpoint's model, and a
    decoder layer called alone (the mask, rotary and position ids as ReferenceMTP passes them) reproduces
    its output inside the model."""
    from transformers import AutoModelForCausalLM
    from transformers.masking_utils import create_causal_mask

    hf, _, path = mtp_ckpt
    loaded = AutoModelForCausalLM.from_pretrained(path).float().eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want = loaded.model(ids).last_hidden_state
        torch.testing.assert_close(ReferenceMTP(hf, {}).main_states(PROMPT)[None], want, rtol=1e-5, atol=1e-5)
        inside = hf.model(ids, output_hidden_states=True).hidden_states
        x = hf.model.embed_tokens(ids)
        pos = torch.arange(len(PROMPT))[None]
        mask = create_causal_mask(config=hf.config, inputs_embeds=x, attention_mask=None, cache=None,
                                  position_ids=pos)
        alone = hf.model.layers[0](x, attention_mask=mask, position_ids=pos,
                                   position_embeddings=hf.model.rotary_emb(x, pos))
    torch.testing.assert_close(alone, inside[1], rtol=1e-5, atol=1e-5)


def test_mtp_logits_match_the_reference(mtp_ckpt):
    hf, tensors, path = mtp_ckpt
    want = ReferenceMTP(hf, tensors).logits(PROMPT)
    model = load(path)
    for chunks in [(None,), (5,), (3, 8)]:  # chunked prefill: later chunks attend to the MTP's cached rows
        got = mtp_logits(model, PROMPT, chunks)
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), chunks
    model.mtp[0].eh_proj.weight.data[:, :4] *= -1  # the oracle can fail: a wrong projection shows
    assert (mtp_logits(model, PROMPT) - want).abs().max() > 1e-2 * want.abs().max()


def test_fp8_block_quantised_mtp_layer(mtp_ckpt, tmp_path):
    """Every projection of the checkpoint (the MTP layer's eh_proj, attention and experts included) stored as
    e4m3 with a weight_scale_inv per 16x16 block loads to exactly the checkpoint of the dequantised weights."""
    _, _, path = mtp_ckpt
    fp8_path, ref_path = tmp_path / "fp8", tmp_path / "ref"
    shutil.copytree(path, fp8_path)
    shutil.copytree(path, ref_path)
    fp8, dense = {}, {}
    for name, w in load_file(path / "model.safetensors").items():
        if re.search(r"(proj|experts\.\d+\.\w+_proj)\.weight$", name):
            q, s = quantize_block_fp8(w, (16, 16))
            fp8[name], fp8[name.replace(".weight", ".weight_scale_inv")] = q, s
            dense[name] = dequantize_block_fp8(q, s, (16, 16))  # checked by hand in test_loader
        else:
            fp8[name] = dense[name] = w
    assert fp8["model.layers.3.eh_proj.weight"].dtype == torch.float8_e4m3fn
    save_file(fp8, fp8_path / "model.safetensors")
    save_file(dense, ref_path / "model.safetensors")
    config = json.loads((fp8_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}
    (fp8_path / "config.json").write_text(json.dumps(config))
    torch.testing.assert_close(mtp_logits(load(fp8_path), PROMPT), mtp_logits(load(ref_path), PROMPT), rtol=0, atol=0)


def test_fp8_experts_of_the_mtp_layer_keep_their_blocks(tmp_path):
    cfg = ModelConfig(**{**TINY.__dict__, "hidden_size": 128, "moe_intermediate_size": 128})
    model = build_model(cfg, mtp=True, fp8_experts=True)
    experts = model.mtp[0].block.mlp.experts
    assert experts.gate_up_proj.dtype == torch.float8_e4m3fn and experts.scales is not None
    again = load(save_checkpoint(model, tmp_path / "ckpt"), fp8_experts=True)
    for a, b in zip(experts.slot_tensors(), again.mtp[0].block.mlp.experts.slot_tensors()):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_mtp_layer_loads_only_when_asked_and_must_share_the_embedding(mtp_ckpt, tmp_path, caplog):
    _, _, path = mtp_ckpt
    plain = build_model(resolve_model_config(ModelConfig(path=str(path))))
    assert len(plain.mtp) == 0 and plain.num_cache_layers == 3
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.3.embed_tokens.weight"][5] += 1
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.embed_tokens\.weight.*differs.*model\.embed_tokens"):
        load(bad)
    none = resolve_model_config(ModelConfig(path=str(path)))
    with pytest.raises(CheckpointError, match="no MTP layers"):
        build_model(ModelConfig(**{**none.__dict__, "num_nextn_predict_layers": 0}), mtp=True)


def test_save_and_load_keep_deepseeks_names(mtp_ckpt, tmp_path):
    _, tensors, path = mtp_ckpt
    written = load_file(save_checkpoint(load(path), tmp_path / "again") / "model.safetensors")
    for name, value in tensors.items():
        assert torch.equal(written[name], value), name
    assert json.loads((tmp_path / "again" / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_mtp_experts_are_placed_recorded_and_moved_like_every_moe_layers():
    """Expert placement and EPLB cover the MTP layer as one more MoE layer (index num_hidden_layers)."""
    mtp = TINY.num_hidden_layers
    two_ranks = default_placement(ParallelState(1, 2, 1, 2, 1, 2, 1, 20, torch.device("cpu"), "gloo"), TINY)
    assert two_ranks.phy2log_LP.shape[0] == TINY.num_moe_layers + 1 == TINY.num_expert_layers
    rank1 = build_model(TINY, dispatcher=LocalDispatcher(10), mtp=True,
                        expert_ids=lambda layer: two_ranks.rank_experts(1, layer))
    assert rank1.mtp[0].block.mlp.experts.expert_ids == two_ranks.rank_experts(1, mtp) == [10, 11, 12, 13, 14, 15,
                                                                                         0, 1, 2, 3]

    state = ParallelState(0, 1, 0, 1, 0, 1, 0, 20, torch.device("cpu"), "gloo")  # 4 redundant slots
    placement = default_placement(state, TINY)
    dispatcher = LocalDispatcher(20)
    dispatcher.placement = placement
    model = build_model(TINY, dispatcher=dispatcher, mtp=True,
                        expert_ids=lambda layer: placement.rank_experts(0, layer))
    assert sorted(model.moe_layers()) == [1, 2, mtp]
    manager = make_eplb_manager(EplbConfig(enabled=True), state, TINY, model, dispatcher)
    assert sorted(manager._experts) == [1, 2, mtp]
    manager.recorder.begin_step()
    batch = AttentionBatch.build([[0, 1]], [0], [5], 4)
    cache = PagedLatentCache(model.num_cache_layers, 2, 4, TINY.kv_lora_rank, TINY.qk_rope_head_dim)
    with torch.inference_mode():
        states = model(torch.tensor([256, 1, 2, 3, 4]), batch, cache)
        model.mtp_forward(torch.tensor([1, 2, 3, 4, 5]), states, batch, cache)
    load = manager.recorder.window_load()
    assert load.shape == (3, TINY.n_routed_experts) and (load.sum(1) == 5 * TINY.num_experts_per_tok).all()
