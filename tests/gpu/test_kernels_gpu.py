"""The Triton kernels compiled on a GPU, at DeepSeek-V3 widths, against their references (relative
error on fresh random inputs; outputs poisoned before each run). Skipped without CUDA."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

if torch.cuda.is_available():
    from moe_pd import kernels
    from moe_pd.fp8 import quantize_act_1x128, quantize_block_fp8
    from moe_pd.model.gate import gate_scores, select_experts, topk_weights

CUDA = "cuda"


def rel_err(got, want):
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all()
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def gen(seed):
    return torch.Generator(device=CUDA).manual_seed(seed)


def test_the_kernels_are_compiled_not_interpreted():
    from moe_pd.kernels._common import interpreted

    assert not interpreted(), "TRITON_INTERPRET=1 on a GPU runs every kernel through numpy (tests/conftest.py)"


def test_act_quant_bit_exact():
    x = torch.randn(4096, 7168, device=CUDA, generator=gen(0), dtype=torch.bfloat16) * 3
    q, s = kernels.quantize_act(x)
    rq, rs = quantize_act_1x128(x)
    assert torch.equal(s, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


def test_fused_gate_v3():
    logits = torch.randn(4096, 256, device=CUDA, generator=gen(1))
    bias = torch.randn(256, device=CUDA, generator=gen(2)) * 0.1
    ids, w = kernels.fused_gate(logits, bias, 8, "sigmoid", "noaux_tc", 8, 4, True, 2.5)
    scores = gate_scores(logits, "sigmoid")
    want = select_experts(scores, 8, "noaux_tc", 8, 4, bias)
    assert torch.equal(ids, want)
    assert torch.allclose(w, topk_weights(scores, want, True, 2.5), atol=1e-5)


def test_permute_unpermute():
    ids = torch.rand(3000, 32, device=CUDA, generator=gen(3)).argsort(dim=1)[:, :8]
    x = torch.randn(3000, 7168, device=CUDA, generator=gen(4), dtype=torch.bfloat16)
    w = torch.rand(3000, 8, device=CUDA, generator=gen(5))
    dest, m_indices = kernels.contiguous_layout(ids, 32)
    permuted = kernels.permute(x, dest, m_indices.numel(), zero_fill=True)
    assert torch.equal(permuted, kernels.permute_reference(x, dest, m_indices.numel()))
    assert rel_err(kernels.unpermute(permuted, dest, w), kernels.unpermute_reference(permuted, dest, w)) < 1e-2


@pytest.mark.parametrize("layout", ["contiguous", "masked"])
@pytest.mark.parametrize("fp8", [False, True])
def test_grouped_gemm_swiglu_and_down(layout, fp8):
    experts, tokens, hidden, inter = 8, 2048, 1024, 512
    ids = torch.rand(tokens, experts, device=CUDA, generator=gen(6)).argsort(dim=1)[:, :2]
    x = torch.randn(tokens, hidden, device=CUDA, generator=gen(7), dtype=torch.bfloat16)
    w13 = torch.randn(experts, 2 * inter, hidden, device=CUDA, generator=gen(8)) / 32
    w2 = torch.randn(experts, hidden, inter, device=CUDA, generator=gen(9)) / 32
    if layout == "contiguous":
        dest, m_indices = kernels.contiguous_layout(ids, experts)
        a, kw = kernels.permute(x, dest, m_indices.numel(), zero_fill=True), {"m_indices": m_indices}
        keep = m_indices >= 0
    else:
        dest, masked_m = kernels.masked_layout(ids, experts, capacity=tokens)
        a = kernels.permute(x, dest, experts * tokens, zero_fill=True).view(experts, tokens, hidden)
        kw = {"masked_m": masked_m}
        keep = torch.arange(tokens, device=CUDA)[None, :] < masked_m[:, None]
    h = kernels.grouped_gemm(a, w13.bfloat16(), swiglu=True, **kw)
    for b, swiglu, a in ((w13, True, a), (w2, False, h)):
        if fp8:
            q = [quantize_block_fp8(e) for e in b]
            bq, bs = torch.stack([t for t, _ in q]), torch.stack([s for _, s in q])
            width = a.shape[-1]
            aq, as_ = quantize_act_1x128(a.reshape(-1, width))
            aq, as_ = aq.view(a.shape), as_.view(*a.shape[:-1], width // 128)
            got = kernels.grouped_gemm(aq, bq, swiglu=swiglu, a_scale=as_, b_scale=bs, **kw)
            want = kernels.grouped_gemm_reference(aq, bq, swiglu=swiglu, a_scale=as_, b_scale=bs, **kw)
            tol = 2e-2
        else:
            got = kernels.grouped_gemm(a, b.bfloat16(), swiglu=swiglu, **kw)
            want = kernels.grouped_gemm_reference(a, b.bfloat16(), swiglu=swiglu, **kw)
            tol = 1e-2
        assert rel_err(got[keep], want[keep]) < tol


@pytest.mark.parametrize("num_splits", [None, 1, 5])  # None: default_splits (several at this batch)
def test_mla_decode_bf16(num_splits):
    batch, heads, pages, page = 16, 128, 512, 64
    cache = torch.randn(pages, page, 576, device=CUDA, generator=gen(10), dtype=torch.bfloat16)
    tables = torch.randperm(pages, device=CUDA, generator=gen(11))[: batch * 16].view(batch, 16)
    lens = torch.randint(1, 16 * page + 1, (batch,), device=CUDA, generator=gen(12))
    q = torch.randn(batch, heads, 512, device=CUDA, generator=gen(13), dtype=torch.bfloat16)
    q_pe = torch.randn(batch, heads, 64, device=CUDA, generator=gen(14), dtype=torch.bfloat16)
    got = kernels.mla_decode(q, q_pe, cache, tables, lens, 0.07, num_splits=num_splits)
    assert rel_err(got, kernels.mla_decode_reference(q, q_pe, cache, tables, lens, 0.07)) < 1e-2


def test_decode_step_graph_replay_equals_the_eager_step():
    from helpers.tiny import TINY
    from moe_pd.config.kvcache import KVCacheConfig
    from moe_pd.config.sampling import SamplingConfig
    from moe_pd.engine.offline import OfflineEngine
    from moe_pd.model.loader import build_model
    from moe_pd.model.ops import select_ops

    prompts = [[256, *b"Hello graphs"], [256, *b"abc"], [256, *range(1, 18)]]
    sampling = SamplingConfig(max_new_tokens=8, ignore_eos=True)
    kv = KVCacheConfig(block_size=16, num_blocks=64)
    model = build_model(TINY, device=CUDA, ops=select_ops("triton", torch.device(CUDA)))
    eager = OfflineEngine(model, kv, 4, CUDA).generate(prompts, sampling)
    graphs = OfflineEngine(model, kv, 4, CUDA, decode_graphs=True)
    assert graphs.engine.graphs.graphs  # captured
    assert [c.output_ids for c in graphs.generate(prompts, sampling)] == [c.output_ids for c in eager]
    reference = OfflineEngine(build_model(TINY, device=CUDA), kv, 4, CUDA).generate(prompts, sampling)
    assert [c.output_ids for c in eager] == [c.output_ids for c in reference]


def test_fp8_experts_kernels_match_their_reference():
    from dataclasses import replace

    from helpers.runner import forward_logits
    from helpers.tiny import TINY
    from moe_pd.model.loader import build_model
    from moe_pd.model.ops import select_ops

    cfg = replace(TINY, hidden_size=256, moe_intermediate_size=128)
    prompts = [[256, *range(1, 60)], [256, 7, 7, 7]]
    reference = torch.cat(forward_logits(build_model(cfg, device=CUDA, fp8_experts=True), prompts))
    model = build_model(cfg, device=CUDA, fp8_experts=True, ops=select_ops("triton", torch.device(CUDA)))
    assert rel_err(torch.cat(forward_logits(model, prompts)), reference) < 1e-3
