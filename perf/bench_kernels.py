"""Kernel benchmarks on one GPU, each a ratio against a baseline measured in the same run.

    python perf/bench_kernels.py [--out results.md] [--quick]

1. Ceilings: HBM bandwidth (a large device-to-device copy, bytes read + written) and dense bf16 GEMM
   TFLOP/s (cuBLAS through torch.mm), measured here, not taken from datasheets.
2. Grouped GEMM bf16, DeepSeek-V3 expert shapes (hidden 7168, moe_inter 2048), contiguous layout,
   4096-16384 rows over 8-32 local experts: ours vs the faster of torch._grouped_mm and cuBLAS dense GEMM at
   the same FLOPs. Target >= 0.9x.
3. FP8 grouped GEMM (1x128 activation, 128x128 weight scales) vs our bf16 on the same shapes. Target >= 1.6x.
4. Masked-layout decode GEMM (<= 256 rows per expert): weight bytes / time as a fraction of the measured HBM
   bandwidth. Target >= 60%.
5. MLA decode attention, batch 64-128, context 4096, latent 512 + 64, 128 heads: bytes / time vs HBM
   bandwidth (target >= 70%), and flashinfer's MLA decode when it imports.
6. A DeepSeek-V3 decode step at reduced depth (random bf16 weights, Triton kernels): eager, CUDA graphs, and
   graphs with FP8 experts; time per step and the fraction of the memory roofline (weights + KV read once).
Times are medians of triton.testing.do_bench; inputs are random (never zeros) and rotate where they would
fit in L2.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

ROWS: list[tuple[str, ...]] = []


def row(*cells) -> None:
    ROWS.append(tuple(str(c) for c in cells))
    print(" | ".join(str(c) for c in cells), flush=True)


def bench(fn, rep_ms: int = 100) -> float:
    """Median milliseconds."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def ceilings() -> tuple[float, float]:
    n = 1 << 30  # 1 GiB per buffer
    src = torch.randn(n // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    bandwidth = 2 * src.numel() * 2 / ms / 1e6  # GB/s: read + write
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    tflops = 2 * 8192**3 / bench(lambda: a @ b) / 1e9
    row("ceiling", "HBM copy", f"{bandwidth:.0f} GB/s", "dense bf16 GEMM 8192^3", f"{tflops:.0f} TFLOP/s")
    return bandwidth, tflops


def layout(rows_total: int, experts: int, seed: int):
    from moe_pd import kernels

    g = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(0, experts, (rows_total, 1), device="cuda", generator=g)
    dest, m_indices = kernels.contiguous_layout(ids, experts)
    return dest, m_indices


def grouped(bandwidth: float, quick: bool) -> None:
    from moe_pd import kernels
    from moe_pd.fp8 import quantize_act_1x128, quantize_block_fp8

    hidden, inter = 7168, 2048
    cases = [(4096, 8), (16384, 32)] if quick else [(4096, 8), (8192, 16), (16384, 16), (16384, 32)]
    for rows_total, experts in cases:
        _, m_indices = layout(rows_total, experts, rows_total + experts)
        m = m_indices.numel()
        for name, n_rows, k, swiglu in (("gate_up+SwiGLU", 2 * inter, hidden, True), ("down", hidden, inter, False)):
            a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            w = torch.randn(experts, n_rows, k, dtype=torch.bfloat16, device="cuda") / 64
            flops = 2 * rows_total * n_rows * k
            ours_ms = bench(lambda: kernels.grouped_gemm(a, w, m_indices=m_indices, swiglu=swiglu))
            dense_b = torch.randn(k, n_rows, dtype=torch.bfloat16, device="cuda")
            dense_a = a[:rows_total]
            dense_ms = bench(lambda: dense_a @ dense_b)
            base_ms, base = dense_ms, "cuBLAS dense"
            try:
                counts = torch.bincount(m_indices[m_indices >= 0].long(), minlength=experts)
                offs = torch.cumsum(counts, 0).to(torch.int32)
                packed = a[m_indices >= 0].contiguous()
                wt = w.transpose(1, 2)
                grouped_ms = bench(lambda: torch._grouped_mm(packed, wt, offs=offs))
                if grouped_ms < base_ms:
                    base_ms, base = grouped_ms, "torch._grouped_mm"
            except Exception as exc:  # not on this torch/GPU
                print(f"torch._grouped_mm unavailable: {str(exc)[:120]}", file=sys.stderr)
            ours = flops / ours_ms / 1e9
            row("grouped bf16", f"{name} rows={rows_total} E={experts}", f"{ours:.0f} TFLOP/s",
                f"{base} {flops / base_ms / 1e9:.0f} TFLOP/s", f"{base_ms / ours_ms:.2f}x (target >= 0.9x)")
            if n_rows % 128 == 0 and k % 128 == 0:
                q = [quantize_block_fp8(e) for e in w]
                wq, ws = torch.stack([t for t, _ in q]), torch.stack([s for _, s in q])
                aq, as_ = quantize_act_1x128(a)
                fp8_ms = bench(lambda: kernels.grouped_gemm(aq, wq, m_indices=m_indices, swiglu=swiglu, a_scale=as_,
                                                            b_scale=ws))
                row("grouped fp8", f"{name} rows={rows_total} E={experts}", f"{flops / fp8_ms / 1e9:.0f} TFLOP/s",
                    f"ours bf16 {ours:.0f} TFLOP/s", f"{ours_ms / fp8_ms:.2f}x (target >= 1.6x)")


def masked(bandwidth: float, quick: bool) -> None:
    from moe_pd import kernels

    hidden, inter = 7168, 2048
    for experts in (8, 32):
        for per_expert in ((64, 256) if quick else (32, 64, 128, 256)):
            w = torch.randn(experts, 2 * inter, hidden, dtype=torch.bfloat16, device="cuda") / 64
            a = torch.randn(experts, per_expert, hidden, dtype=torch.bfloat16, device="cuda")
            masked_m = torch.full((experts,), per_expert, dtype=torch.int32, device="cuda")
            ms = bench(lambda: kernels.grouped_gemm(a, w, masked_m=masked_m, swiglu=True))
            gbs = w.numel() * 2 / ms / 1e6
            row("masked bf16", f"gate_up+SwiGLU E={experts} rows/expert={per_expert}", f"{ms * 1e3:.0f} us",
                f"{gbs:.0f} GB/s of weights", f"{gbs / bandwidth:.0%} of HBM (target >= 60%)")


def mla(bandwidth: float, quick: bool) -> None:
    from moe_pd import kernels

    heads, context, page = 128, 4096, 64
    for batch in ((8, 64) if quick else (8, 64, 128)):  # 8: few programs per SM, where context splits matter
        pages = batch * context // page
        cache = torch.randn(pages, page, 576, dtype=torch.bfloat16, device="cuda")
        tables = torch.randperm(pages, device="cuda").view(batch, context // page)
        lens = torch.full((batch,), context, device="cuda")
        q = torch.randn(batch, heads, 512, dtype=torch.bfloat16, device="cuda")
        q_pe = torch.randn(batch, heads, 64, dtype=torch.bfloat16, device="cuda")
        nbytes = cache.numel() * 2 + 2 * q.numel() * 2 + q_pe.numel() * 2
        splits = kernels.default_splits(batch, heads, q.device)
        times = {}
        for label, n in (("unsplit", 1), (f"{splits} splits (default)", splits)) if splits > 1 else (("", 1),):
            times[label] = ms = bench(lambda: kernels.mla_decode(q, q_pe, cache, tables, lens, 0.0625, num_splits=n))
            gbs = nbytes / ms / 1e6
            row("mla decode", f"batch={batch} context={context} heads={heads} {label}".rstrip(), f"{ms * 1e3:.0f} us",
                f"{gbs:.0f} GB/s", f"{gbs / bandwidth:.0%} of HBM (target >= 70%)")
        if len(times) == 2:
            unsplit, split = times.values()
            row("mla decode", f"batch={batch}: split / unsplit speed-up", f"{unsplit / split:.2f}x", "", "")
        try:
            import flashinfer  # noqa: F401
            row("mla decode", "flashinfer", "installed: comparison not wired yet", "", "")
        except ImportError:
            row("mla decode", "flashinfer", "not installed on this machine", "", "")


def decode_step(bandwidth: float, quick: bool) -> None:
    """DeepSeek-V3 widths at reduced depth and expert count, random bf16 weights initialised on the GPU."""
    from hydra import compose, initialize_config_module

    from moe_pd.config.hf import resolve_model_config
    from moe_pd.config.kvcache import KVCacheConfig
    from moe_pd.config.store import register_configs, to_config
    from moe_pd.engine.llm_engine import LLMEngine
    from moe_pd.kvcache.paged import AttentionBatch
    from moe_pd.model.experts import RoutedExperts
    from moe_pd.model.ops import select_ops
    from moe_pd.model.transformer import DeepseekForCausalLM

    register_configs()
    with initialize_config_module("moe_pd.conf", version_base=None):
        cfg = to_config(compose("generate", overrides=[
            "model=deepseek_v3", "model.num_hidden_layers=3", "model.n_routed_experts=32",
            "model.max_position_embeddings=8192"])).model
    cfg = resolve_model_config(cfg)
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    for b in model.buffers():  # to_empty leaves them uninitialised (the gate's correction bias among them)
        b.zero_()
    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.float()
    model.model.rotary.reset_parameters()
    model.use_ops(select_ops("triton", torch.device("cuda"))).eval().requires_grad_(False)
    batch, context = 64, 1024
    kv = KVCacheConfig(block_size=64, num_blocks=batch * context // 64 + 8)
    pages = context // 64
    tables = [list(range(i * pages, (i + 1) * pages)) for i in range(batch)]
    step = AttentionBatch.build(tables, [context - 1] * batch, [1] * batch, 64, "cuda")
    ids = torch.randint(0, cfg.vocab_size, (batch,), device="cuda")
    kv_bytes = batch * context * cfg.num_hidden_layers * 576 * 2
    results = {}
    for name, graphs, fp8 in (("eager", False, False), ("graphs", True, False), ("graphs + FP8 experts", True, True)):
        if fp8:
            for module in model.modules():
                if isinstance(module, RoutedExperts):
                    module.quantize_fp8()
        engine = LLMEngine(model, kv, batch, 8192, "cuda", decode_graphs=graphs)
        results[name] = ms = bench(lambda: engine._forward(ids, step))
        weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                      if "embed" not in n and "lm_head" not in n)
        floor_ms = (weights + kv_bytes) / bandwidth / 1e6
        row("decode step", f"V3 widths, {cfg.num_hidden_layers} layers, 32 experts, batch {batch}, context {context}: "
            f"{name}", f"{ms:.2f} ms", f"eager {results['eager'] / ms:.2f}x faster" if graphs else "",
            f"memory roofline {floor_ms:.2f} ms: {floor_ms / ms:.0%} of it")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the table as markdown here")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--only", default="ceilings,grouped,masked,mla,decode")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU (the kernels' CPU checks are tests/unit/test_kernels.py)")
        return 0
    started = time.time()
    bandwidth, _ = ceilings()
    parts = {"grouped": grouped, "masked": masked, "mla": mla, "decode": decode_step}
    for name in args.only.split(","):
        if name in parts:
            try:
                parts[name](bandwidth, args.quick)
            except Exception as exc:  # one failing part must not hide the others' figures
                row(name, "FAILED", f"{type(exc).__name__}: {str(exc)[:200]}", "", "")
            torch.cuda.empty_cache()
    table = ["| part | case | ours | baseline | ratio |", "|---|---|---|---|---|"]
    table += [f"| {' | '.join(r + ('',) * (5 - len(r)))} |" for r in ROWS]
    text = "\n".join(table) + f"\n\n{torch.cuda.get_device_name(0)}, torch {torch.__version__}, " \
                              f"{time.time() - started:.0f} s\n"
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
