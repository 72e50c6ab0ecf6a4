"""Every Triton kernel against its torch reference, run by Triton's interpreter on the CPU
(TRITON_INTERPRET=1, set in conftest.py), and the whole model through the kernels. bf16 results may
differ by 1 bf16 ulp (DEVELOPERS.md)."""

import pytest
import torch

pytest.importorskip("triton")

from helpers.tiny import TINY  # noqa: E402
from moe_pd import kernels  # noqa: E402
from moe_pd.config.kvcache import KVCacheConfig  # noqa: E402
from moe_pd.config.sampling import SamplingConfig  # noqa: E402
from moe_pd.engine.offline import OfflineEngine  # noqa: E402
from moe_pd.fp8 import quantize_act_1x128, quantize_block_fp8  # noqa: E402
from moe_pd.model.gate import gate_scores, select_experts, topk_weights  # noqa: E402
from moe_pd.model.loader import build_model  # noqa: E402
from moe_pd.model.ops import select_ops  # noqa: E402


def ulp_close(got, want, ulps=1):
    """Within `ulps` units in the last place of `got`'s dtype at the reference's magnitude."""
    eps = torch.finfo(got.dtype).eps if got.dtype.is_floating_point else 0
    tol = ulps * eps * want.float().abs().clamp(min=1.0) * 2 + (1e-5 if got.dtype == torch.float32 else 0)
    return bool(((got.float() - want.float()).abs() <= tol).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant_equals_the_reference_bit_for_bit(dtype):
    x = (torch.randn(7, 384, generator=torch.Generator().manual_seed(1)) * 5).to(dtype)
    x[3] = 0  # an all-zero group takes the 1e-12 floor
    q, s = kernels.quantize_act(x)
    rq, rs = quantize_act_1x128(x)
    assert torch.equal(s, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))


@pytest.mark.parametrize("scoring, method, experts, groups, topk_group, top_k, bias", [
    ("sigmoid", "noaux_tc", 16, 4, 2, 4, True),            # the tiny V3
    ("sigmoid", "noaux_tc", 256, 8, 4, 8, True),           # DeepSeek-V3
    ("softmax", "group_limited_greedy", 64, 8, 3, 6, False),
    ("softmax", "greedy", 64, 1, 1, 6, False),              # V2-Lite
])
def test_fused_gate_picks_the_same_experts_and_weights(scoring, method, experts, groups, topk_group, top_k, bias):
    g = torch.Generator().manual_seed(experts)
    logits = torch.randn(37, experts, generator=g)
    logits[5] = 0.0  # all ties: the lower index wins in both
    bias_E = torch.randn(experts, generator=g) * 0.1 if bias else None
    ids, weights = kernels.fused_gate(logits, bias_E, top_k, scoring, method, groups, topk_group, True, 2.5)
    scores = gate_scores(logits, scoring)
    want = select_experts(scores, top_k, method, groups, topk_group, bias_E)
    assert torch.equal(ids, want)
    assert torch.allclose(weights, topk_weights(scores, want, True, 2.5), atol=1e-6)


def test_fused_gate_refuses_shapes_it_cannot_take():
    with pytest.raises(ValueError, match="power-of-two expert count"):
        kernels.fused_gate(torch.randn(2, 24), None, 2, "sigmoid", "noaux_tc", 4, 2)
    with pytest.raises(ValueError, match="topk_group"):
        kernels.fused_gate(torch.randn(2, 16), None, 2, "sigmoid", "noaux_tc", 4, 5)


def routing(tokens=29, top_k=3, experts=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    return ids, torch.rand(tokens, top_k, generator=g)


def test_contiguous_layout_pads_segments_to_128_and_marks_padding():
    ids, _ = routing()
    dest, m_indices = kernels.contiguous_layout(ids, 5)
    counts = torch.bincount(ids.flatten(), minlength=5)
    assert m_indices.numel() == int(((counts + 127) // 128 * 128).sum())
    assert torch.equal(m_indices[dest].long(), ids)  # every pair lands in its expert's segment
    assert int((m_indices >= 0).sum()) == ids.numel() and len(set(dest.flatten().tolist())) == ids.numel()
    starts = (m_indices[1:] != m_indices[:-1]).nonzero().flatten() + 1
    assert all(int(s) % 128 == 0 for s in starts if m_indices[s] >= 0)


@pytest.mark.parametrize("layout", ["contiguous", "masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_and_weighted_unpermute(layout, dtype):
    ids, weights = routing()
    x = torch.randn(ids.shape[0], 48).to(dtype)
    if layout == "contiguous":
        dest, m_indices = kernels.contiguous_layout(ids, 5)
        rows = m_indices.numel()
    else:
        dest, masked_m = kernels.masked_layout(ids, 5, capacity=32)
        rows = 5 * 32
        assert torch.equal(masked_m.long(), torch.bincount(ids.flatten(), minlength=5))
    permuted = kernels.permute(x, dest, rows, zero_fill=True)
    assert torch.equal(permuted, kernels.permute_reference(x, dest, rows))
    assert ulp_close(kernels.unpermute(permuted, dest, weights), kernels.unpermute_reference(permuted, dest, weights))


def test_masked_layout_drops_rows_beyond_capacity():
    ids = torch.zeros(6, 1, dtype=torch.int64)  # six tokens for expert 0, room for four
    dest, masked_m = kernels.masked_layout(ids, 2, capacity=4)
    assert dest.flatten().tolist() == [0, 1, 2, 3, -1, -1] and masked_m.tolist() == [4, 0]


def grouped_case(layout, k_dim=64, n_dim=48, experts=4, seed=0):
    ids, _ = routing(tokens=40, top_k=2, experts=experts, seed=seed)
    x = torch.randn(40, k_dim, generator=torch.Generator().manual_seed(seed + 1))
    if layout == "contiguous":
        dest, m_indices = kernels.contiguous_layout(ids, experts)
        return kernels.permute(x, dest, m_indices.numel(), zero_fill=True), {"m_indices": m_indices}
    dest, masked_m = kernels.masked_layout(ids, experts, capacity=32)
    return kernels.permute(x, dest, experts * 32, zero_fill=True).view(experts, 32, k_dim), {"masked_m": masked_m}


def valid_rows(out, layout_kw):
    if "m_indices" in layout_kw:
        return out[layout_kw["m_indices"] >= 0]
    valid = torch.arange(out.shape[1])[None, :] < layout_kw["masked_m"][:, None]
    return out[valid]


@pytest.mark.parametrize("layout", ["contiguous", "masked"])
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm(layout, swiglu, dtype):
    a, layout_kw = grouped_case(layout)
    b = torch.randn(4, 96 if swiglu else 48, 64, generator=torch.Generator().manual_seed(7)) / 8
    a, b = a.to(dtype), b.to(dtype)
    got = kernels.grouped_gemm(a, b, swiglu=swiglu, **layout_kw)
    want = kernels.grouped_gemm_reference(a, b, swiglu=swiglu, **layout_kw)
    assert got.shape == want.shape and got.dtype == dtype
    assert ulp_close(valid_rows(got, layout_kw), valid_rows(want, layout_kw), ulps=1 if dtype == torch.bfloat16 else 4)


@pytest.mark.parametrize("layout", ["contiguous", "masked"])
@pytest.mark.parametrize("swiglu", [False, True])
def test_fp8_grouped_gemm_with_block_scales(layout, swiglu):
    a, layout_kw = grouped_case(layout, k_dim=256)
    n_rows = 256 if swiglu else 128
    w = torch.randn(4, n_rows, 256, generator=torch.Generator().manual_seed(3)) / 16
    quantized = [quantize_block_fp8(e) for e in w]
    b, b_scale = torch.stack([q for q, _ in quantized]), torch.stack([s for _, s in quantized])
    a_q, a_scale = quantize_act_1x128(a.reshape(-1, 256))
    a_q, a_scale = a_q.view(a.shape), a_scale.view(*a.shape[:-1], 2)
    got = kernels.grouped_gemm(a_q, b, swiglu=swiglu, a_scale=a_scale, b_scale=b_scale, **layout_kw)
    want = kernels.grouped_gemm_reference(a_q, b, swiglu=swiglu, a_scale=a_scale, b_scale=b_scale, **layout_kw)
    assert got.dtype == torch.bfloat16
    assert ulp_close(valid_rows(got, layout_kw), valid_rows(want, layout_kw))
    exact = kernels.grouped_gemm_reference(a.float(), w, swiglu=swiglu, **layout_kw)  # before quantisation
    err = (valid_rows(got, layout_kw).float() - valid_rows(exact, layout_kw)).abs().max()
    assert err < 0.05 * valid_rows(exact, layout_kw).abs().max()


def test_grouped_gemm_refuses_mismatched_operands():
    a, layout_kw = grouped_case("contiguous")
    with pytest.raises(ValueError, match="does not fit"):
        kernels.grouped_gemm(a, torch.randn(4, 48, 32), **layout_kw)
    with pytest.raises(ValueError, match="exactly one of"):
        kernels.grouped_gemm(a, torch.randn(4, 48, 64))
    with pytest.raises(ValueError, match="both fp8 or neither"):
        kernels.grouped_gemm(a, torch.randn(4, 48, 64).to(torch.float8_e4m3fn), **layout_kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3])  # 3: flash-decoding chunks, some of them empty for the short contexts
def test_mla_decode_over_the_paged_cache(dtype, splits):
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(24, 16, 32 + 8, generator=g).to(dtype)
    tables = torch.randperm(24, generator=g)[:18].view(3, 6)
    lens = torch.tensor([1, 37, 96])  # one token, a partial last page, a full table
    q = torch.randn(3, 4, 32, generator=g).to(dtype)
    q_pe = torch.randn(3, 4, 8, generator=g).to(dtype)
    got = kernels.mla_decode(q, q_pe, cache, tables, lens, 0.15, num_splits=splits)
    want = kernels.mla_decode_reference(q, q_pe, cache, tables, lens, 0.15)
    assert ulp_close(got, want, ulps=2 if dtype == torch.bfloat16 else 4)
    padded = kernels.mla_decode(q, q_pe, cache, tables, torch.tensor([0, 37, 0]), 0.15, num_splits=splits)
    assert torch.equal(padded[0], torch.zeros_like(padded[0])) and torch.equal(padded[1], got[1])  # padding slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3])
def test_mla_decode_with_several_queries_per_sequence_is_causal(dtype, splits):
    """Speculative verification: 3 new tokens per sequence packed into the head axis (query-major); query q
    attends like a one-query decode of the sequence cut after its own token."""
    g = torch.Generator().manual_seed(1)
    queries, heads = 3, 4
    cache = torch.randn(24, 16, 32 + 8, generator=g).to(dtype)
    tables = torch.randperm(24, generator=g)[:18].view(3, 6)
    lens = torch.tensor([3, 38, 96])  # the three new tokens only, a page boundary inside them, a full table
    q = torch.randn(3, queries * heads, 32, generator=g).to(dtype)
    q_pe = torch.randn(3, queries * heads, 8, generator=g).to(dtype)
    want = kernels.mla_decode_reference(q, q_pe, cache, tables, lens, 0.15, queries=queries)
    for i in range(queries):
        rows = slice(i * heads, (i + 1) * heads)
        one = kernels.mla_decode_reference(q[:, rows], q_pe[:, rows], cache, tables, lens - (queries - 1 - i), 0.15)
        torch.testing.assert_close(want[:, rows], one, rtol=0, atol=0)
    got = kernels.mla_decode(q, q_pe, cache, tables, lens, 0.15, num_splits=splits, queries=queries)
    assert ulp_close(got, want, ulps=2 if dtype == torch.bfloat16 else 4)
    with pytest.raises(ValueError, match="not 5 queries"):
        kernels.mla_decode(q, q_pe, cache, tables, lens, 0.15, queries=5)


@pytest.mark.timeout(300)
def test_the_model_through_the_kernels_generates_the_reference_tokens():
    prompts = [[256, *b"Hello kernels"], [256, *b"abc"], [256, *range(1, 18)]]
    sampling = SamplingConfig(max_new_tokens=5, ignore_eos=True)
    # no DRAM tier: the second engine would promote the first one's pages, and a promoting sequence joins
    # the batch a step later (fewer sequences in the last decode step)
    kv = KVCacheConfig(block_size=4, num_blocks=64, host_tier_gib=0)
    want = OfflineEngine(build_model(TINY), kv, 4).generate(prompts, sampling)
    model = build_model(TINY, ops=select_ops("triton", torch.device("cpu")))
    assert model.ops.name == "triton"
    got = OfflineEngine(model, kv, 4).generate(prompts, sampling)
    assert [c.output_ids for c in got] == [c.output_ids for c in want]


def test_kernel_choice_is_made_once_and_checked():
    assert select_ops("auto", torch.device("cpu")).name == "torch"
    assert select_ops("torch", torch.device("cpu")).name == "torch"
    assert build_model(TINY).ops is None  # no choice: the references


def test_triton_on_cpu_without_the_interpreter_is_a_config_error(monkeypatch):
    from moe_pd.config.errors import ConfigError

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        select_ops("triton", torch.device("cpu"))


@pytest.mark.timeout(300)
def test_decode_graph_runner_pads_to_buckets_and_keeps_the_tokens():
    """The static-buffer decode step the CUDA graphs capture, run eagerly here: 3 sequences in the bucket
    of 4 (one padding slot), the same greedy tokens as the plain engine, padding never written to a
    sequence's pages."""
    prompts = [[256, *b"Hello graphs"], [256, *b"abc"], [256, *range(1, 18)]]
    sampling = SamplingConfig(max_new_tokens=5, ignore_eos=True)
    # no DRAM tier: the second engine would promote the first one's pages, and a promoting sequence joins
    # the batch a step later (fewer sequences in the last decode step)
    kv = KVCacheConfig(block_size=4, num_blocks=64, host_tier_gib=0)
    want = OfflineEngine(build_model(TINY), kv, 4).generate(prompts, sampling)
    model = build_model(TINY, ops=select_ops("triton", torch.device("cpu")))
    offline = OfflineEngine(model, kv, 4, decode_graphs=True)
    runner = offline.engine.graphs
    assert runner.buckets == [1, 2, 4] and offline.engine.cache.num_blocks == 65  # + the scratch page
    seen = []
    run = runner.run
    runner.run = lambda ids, batch: (seen.append(batch.num_seqs), run(ids, batch))[1]
    got = offline.generate(prompts, sampling)
    assert [c.output_ids for c in got] == [c.output_ids for c in want]
    assert seen == [3] * 4  # every decode step (5 tokens: the first comes from prefill) took the graph path
    assert not runner.valid_B[3] and int(runner.seq_lens_B[3]) == 0 and int(runner.slots_B[3]) == 64 * 4


def test_decode_graphs_need_the_kernels():
    from moe_pd.engine.llm_engine import LLMEngine

    with pytest.raises(ValueError, match="Triton ops"):
        LLMEngine(build_model(TINY), KVCacheConfig(block_size=4, num_blocks=8), 2, 64, decode_graphs=True)


@pytest.mark.timeout(300)
def test_fp8_experts_through_the_kernels_match_the_fp8_reference():
    """Routed experts in FP8 (128x128 block scales, activations 1x128): the kernels and the torch reference
    of the same arithmetic agree, and an expert block stays within e4m3's
    precision of its unquantised self."""
    from dataclasses import replace

    from helpers.runner import forward_logits

    cfg = replace(TINY, hidden_size=128, moe_intermediate_size=128)  # FP8 blocks need widths in 128s
    prompts = [[256, *b"FP8 experts"], [256, *range(1, 20)]]
    exact = torch.cat(forward_logits(build_model(cfg), prompts))
    reference_model = build_model(cfg, fp8_experts=True)
    assert reference_model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    reference = torch.cat(forward_logits(reference_model, prompts))
    kernel_model = build_model(cfg, fp8_experts=True, ops=select_ops("triton", torch.device("cpu")))
    got = torch.cat(forward_logits(kernel_model, prompts))
    assert torch.allclose(got, reference, atol=1e-4, rtol=1e-4)
    assert (reference - exact).abs().max() > 0  # the experts really ran in FP8
    experts = build_model(cfg).model.layers[1].mlp.experts
    x, counts = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)), torch.tensor([16, 16, 8, 8, 16])
    counts = torch.cat([counts, torch.zeros(experts.num_local_experts - 5, dtype=torch.int64)])
    unquantised = experts(x, counts)
    experts.quantize_fp8()
    # e4m3 keeps 3 mantissa bits (half an ulp is 6.25%); two GEMMs with block scales land near 6-7%
    assert (experts(x, counts) - unquantised).norm() / unquantised.norm() < 0.1
