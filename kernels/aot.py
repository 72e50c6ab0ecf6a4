"""Compile every Triton kernel ahead of time for a GPU that need not be present, with every config its
autotuner can choose, at the shapes the model presets use; report shared memory, registers and spills.

    python -m moe_pd.kernels.aot --arch sm_90a --arch sm_100a          # everything (the GPU suite runs this)
    python -m moe_pd.kernels.aot --arch sm_90a --subset ci              # one config per variant (CI)
    python -m moe_pd.kernels.aot --arch native                          # the GPU this machine has

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` runs Triton's whole pipeline down to a
cubin with the ptxas that ships in triton's wheel, so it catches what the interpreter cannot: tl.dot shape
and dtype rules, fp8 on the target, shared memory over the architecture's limit, register spills. One row
per (kernel, variant, config, arch); the last line is `N kernels compiled, M failed`; the exit status is 1
on any failure or any config over a limit (shared memory per block, or registers spilled to local memory).
Run it without TRITON_INTERPRET (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace

SHARED_LIMIT = {90: 232448, 100: 232448}
"""Shared memory one block may opt in to (bytes): 227 KB on Hopper (sm_90) and Blackwell (sm_100), per
NVIDIA's CUDA C++ Programming Guide, "Features and Technical Specifications"."""
ARCHS = {"sm_90a": 90, "sm_100a": 100}
MODELS = ("deepseek_v3", "deepseek_v2_lite", "tiny")


@dataclass(frozen=True)
class Case:
    """One compilation: a kernel at one variant (dtypes, flags, shapes) and one config."""

    kernel: str
    variant: str
    module: str
    """'<module under moe_pd.kernels>:<jitted function>', e.g. 'grouped_gemm:_grouped_gemm_kernel'."""
    args: dict[str, object]
    """Every runtime argument: a pointer's element type as '*bf16', or an int / float example value."""
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 3


@dataclass
class Result:
    case: Case
    arch: str
    error: str = ""
    shared: int = 0
    registers: int = 0
    stack: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def _config_cases(kernel, variant, module, args, constexprs, configs) -> list[Case]:
    return [Case(kernel, variant, module, args, {**constexprs, **c.kwargs}, c.num_warps, c.num_stages)
            for c in configs]


def _gate_cases(name, cfg) -> list[Case]:
    import triton

    from moe_pd.kernels.gate import METHOD, SCORING

    e = cfg.n_routed_experts
    if e & (e - 1):
        return []  # the model falls back to the torch gate (moe_pd.model.ops)
    greedy = cfg.topk_method == "greedy"
    args = {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "ids_ptr": "*i64", "weights_ptr": "*fp32", "stride_t": e,
            "scaling": float(cfg.routed_scaling_factor)}
    const = {"E": e, "G": 1 if greedy else cfg.n_group, "TOPK_GROUP": cfg.topk_group, "K": cfg.num_experts_per_tok,
             "K_PAD": triton.next_power_of_2(cfg.num_experts_per_tok), "SCORING_": SCORING[cfg.scoring_func],
             "METHOD_": METHOD[cfg.topk_method], "HAS_BIAS": not greedy, "NORMALIZE": cfg.norm_topk_prob}
    return [Case("fused_gate", f"{name} E={e} top{cfg.num_experts_per_tok}", "gate:_gate_kernel", args, const)]


def _act_quant_cases(name, cfg, dtype) -> list[Case]:
    return [Case("act_quant", f"{name} {dtype} D={d}", "act_quant:_quantize_kernel",
                 {"x_ptr": f"*{dtype}", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "stride_x": d, "stride_q": d},
                 {"D": d, "GROUP_SIZE": 128, "FP8_MAX_": 448.0}, num_warps=4)
            for d in sorted({cfg.hidden_size, cfg.moe_intermediate_size}) if d % 128 == 0]


def _permute_cases(name, cfg, dtype) -> list[Case]:
    from moe_pd.kernels.permute import _block_d

    cases = []
    for d in sorted({cfg.hidden_size, cfg.moe_intermediate_size}):
        block = _block_d(d)
        for k in sorted({1, cfg.num_experts_per_tok}):  # 1: rows grouped by expert (ops.experts); K: masked dispatch
            cases.append(Case("permute", f"{name} {dtype} D={d} K={k}", "permute:_permute_kernel",
                              {"x_ptr": f"*{dtype}", "dest_ptr": "*i64", "out_ptr": f"*{dtype}", "stride_x": d,
                               "stride_out": d, "D": d}, {"K": k, "BLOCK_D": block}))
            cases.append(Case("unpermute", f"{name} {dtype} D={d} K={k}", "permute:_unpermute_kernel",
                              {"y_ptr": f"*{dtype}", "dest_ptr": "*i64", "w_ptr": "*fp32", "out_ptr": f"*{dtype}",
                               "stride_y": d, "stride_out": d, "D": d},
                              {"K": k, "BLOCK_D": block, "HAS_WEIGHTS": k > 1}))
    return cases


def _grouped_gemm_cases(subset: bool) -> list[Case]:
    """The kernel's only shape constexprs are tiles, so one set of variants covers every model; N and K are
    runtime ints (V3's 7168 / 2048 as examples, both multiples of 16 like every preset's)."""
    gg = importlib.import_module("moe_pd.kernels.grouped_gemm")  # the package exports a function of that name

    cases = []
    for dtype in ("bf16", "fp8e4nv", "fp32"):
        fp8 = dtype == "fp8e4nv"
        for masked in (False, True):
            for swiglu in (True, False):
                configs = gg._prune(gg._configs(), {"FP8": fp8, "SWIGLU": swiglu, "IEEE": dtype == "fp32"})
                n, k = (2048, 7168) if swiglu else (7168, 2048)
                out = "bf16" if fp8 else dtype
                args = {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "c_ptr": f"*{out}", "a_scale_ptr": "*fp32",
                        "b_scale_ptr": "*fp32", "m_indices_ptr": "*i32", "masked_m_ptr": "*i32", "M": 8192, "N": n,
                        "K": k, "CAPACITY": 256, "stride_am": k, "stride_bg": (2 if swiglu else 1) * n * k,
                        "stride_bn": k, "stride_cm": n}
                const = {"MASKED": masked, "SWIGLU": swiglu, "FP8": fp8, "UPCAST": False, "IEEE": dtype == "fp32"}
                variant = f"{dtype} {'masked' if masked else 'contiguous'}{' swiglu' if swiglu else ''}"
                cases += _config_cases("grouped_gemm", variant, "grouped_gemm:_grouped_gemm_kernel", args, const,
                                       configs[:1] if subset else configs)
    return cases


def _mla_cases(name, cfg, dtype, pages: tuple[int, ...], subset: bool) -> list[Case]:
    """Decode (one query per sequence) and speculative verification (4 queries: 3 drafts and the last token,
    packed into the head axis) at every page size, with and without context splits."""
    mla = importlib.import_module("moe_pd.kernels.mla_decode")

    c, r = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    cases = []
    for page in pages:
        for queries in (1, 4):
            for partial in (False, True):
                h = queries * cfg.num_attention_heads
                args = {"q_ptr": f"*{dtype}", "qpe_ptr": f"*{dtype}", "cache_ptr": f"*{dtype}", "tables_ptr": "*i64",
                        "lens_ptr": "*i64", "out_ptr": "*fp32" if partial else f"*{dtype}", "ml_ptr": "*fp32",
                        "scale": 0.1, "H": h, "SPLITS": 4 if partial else 1, "HEADS": cfg.num_attention_heads,
                        "stride_qb": h * c, "stride_qh": c, "stride_pb": h * r, "stride_ph": r, "stride_tb": 64,
                        "stride_ob": h * c, "stride_oh": c}
                const = {"C": c, "R": r, "PAGE": page, "UPCAST": False, "IEEE": dtype == "fp32", "PARTIAL": partial,
                         "QUERIES": queries}
                variant = f"{name} {dtype} C={c}+{r} page={page}{' split' if partial else ''}" + \
                    (f" verify Q={queries}" if queries > 1 else "")
                configs = mla._configs()
                cases += _config_cases("mla_decode", variant, "mla_decode:_mla_decode_kernel", args, const,
                                       configs[:1] if subset else configs)
    return cases


def cases(models: tuple[str, ...] = MODELS, subset: bool = False) -> list[Case]:
    """Every kernel at every preset's shapes: bf16 (and FP8 where the model quantises) for the real models,
    fp32 for the tiny model that the GPU tests run. Presets that compile to the same kernel (V3 and V2-Lite
    share MLA's widths; head counts are run-time arguments) give one case, labelled with both."""
    from moe_pd.config.store import model_preset

    out = _grouped_gemm_cases(subset)
    for name in models:
        cfg = model_preset(name)
        dtype = "fp32" if name == "tiny" else "bf16"
        out += _gate_cases(name, cfg) + _act_quant_cases(name, cfg, "bf16") + _permute_cases(name, cfg, dtype)
        out += _mla_cases(name, cfg, dtype, (16,) if subset else (16, 64), subset)
    unique: dict[tuple, Case] = {}
    for case in out:
        key = _compile_key(case)
        if key in unique:
            first = unique[key]
            model, _, rest = case.variant.partition(" ")
            if model in MODELS and rest == first.variant.partition(" ")[2]:
                case = replace(first, variant=f"{first.variant.partition(' ')[0]}+{model} {rest}")
            else:
                continue
        unique[key] = case
    return list(unique.values())


def _compile_key(case: Case) -> tuple:
    """What the compiler sees: argument types, 16-divisibility of ints, constexprs, warps and stages."""
    kinds = tuple((k, v if isinstance(v, str) else "fp32" if isinstance(v, float) else v % 16 == 0)
                  for k, v in case.args.items())
    return case.module, kinds, tuple(case.constexprs.items()), case.num_warps, case.num_stages


def _signature_and_attrs(fn, case: Case) -> tuple[dict[str, str], dict]:
    """Triton's JIT signature for these arguments: pointers and ints as typed, constexprs named, and the
    16-divisibility hint on every pointer and on ints that are multiples of 16 (as the JIT specialises)."""
    signature, attrs = {}, {}
    missing = set(fn.arg_names) - set(case.args) - set(case.constexprs)
    if missing:
        raise ValueError(f"{case.kernel}: no value for {sorted(missing)}")
    for i, arg in enumerate(fn.arg_names):
        if arg in case.constexprs:
            signature[arg] = "constexpr"
            continue
        value = case.args[arg]
        if isinstance(value, str):
            signature[arg] = value
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _resources(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack frame bytes, static shared bytes) from cuobjdump, which ships with triton."""
    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not found:
        raise RuntimeError(f"cuobjdump printed no resource usage: {text[:200]}")
    reg, stack, shared, local = map(int, found.groups())
    return reg, stack + local, shared


def compile_case(case: Case, arch: str) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = Result(case, arch)
    start = time.perf_counter()
    try:
        module, name = case.module.split(":")
        fn = getattr(importlib.import_module(f"moe_pd.kernels.{module}"), name)
        while not isinstance(fn, triton.runtime.JITFunction):  # an autotuner wraps the JITFunction
            fn = fn.fn
        signature, attrs = _signature_and_attrs(fn, case)
        capability = ARCHS[arch]
        kernel = triton.compile(ASTSource(fn, signature, case.constexprs, attrs),
                                target=GPUTarget("cuda", capability, 32),
                                options={"num_warps": case.num_warps, "num_stages": case.num_stages})
        result.registers, result.stack, static_shared = _resources(kernel.asm["cubin"])
        result.shared = kernel.metadata.shared + static_shared
        if result.shared > SHARED_LIMIT[capability]:
            result.problems.append(f"shared {result.shared} B > {SHARED_LIMIT[capability]} B")
        if result.stack:
            result.problems.append(f"{result.stack} B of local memory (registers spilled)")
    except Exception as exc:  # noqa: BLE001 - every failure is a row of the report
        result.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    result.seconds = time.perf_counter() - start
    return result


def _native_arch() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    arch = {(9, 0): "sm_90a", (10, 0): "sm_100a"}.get((major, minor))
    if arch is None:
        sys.exit(f"no AOT target for this GPU's capability {major}.{minor}; choose from {sorted(ARCHS)}")
    return arch


def format_row(r: Result) -> str:
    c = r.case
    config = " ".join(f"{k}={v}" for k, v in c.constexprs.items() if k.startswith("BLOCK"))
    config = f"{config} w{c.num_warps} s{c.num_stages}".strip()
    if r.error:
        status, detail = "FAILED", r.error
    else:
        status = "OVER LIMIT" if r.problems else "ok"
        detail = f"shared {r.shared / 1024:.1f} KiB of {SHARED_LIMIT[ARCHS[r.arch]] // 1024}, {r.registers} regs, " \
                 f"stack {r.stack} B" + (f"; {'; '.join(r.problems)}" if r.problems else "")
    return f"{r.arch} | {c.kernel} | {c.variant} | {config} | {status} | {detail} | {r.seconds:.1f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", choices=[*ARCHS, "native"],
                        help="target (repeatable); default sm_90a and sm_100a")
    parser.add_argument("--subset", choices=["all", "ci"], default="all",
                        help="ci: the first config of each variant, pages of 16 (bounded for CI)")
    parser.add_argument("--model", action="append", choices=MODELS, help="presets whose shapes to compile "
                        "(repeatable); default all")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 replaces the compiler with the interpreter: unset it")
    archs = [_native_arch() if a == "native" else a for a in (args.arch or ["sm_90a", "sm_100a"])]
    todo = [(case, arch) for arch in archs for case in cases(tuple(args.model or MODELS), args.subset == "ci")]
    print(f"compiling {len(todo)} kernel configs for {', '.join(archs)} with {args.jobs} processes", flush=True)
    print("arch | kernel | variant | config | status | resources | time")
    failed = 0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for result in pool.map(compile_case, *zip(*todo)):
            failed += bool(result.error or result.problems)
            print(format_row(result), flush=True)
    print(f"{len(todo) - failed} kernels compiled, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
