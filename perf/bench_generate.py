"""Offline generation throughput of the tiny model: moe_pd vs transformers' generate on the same weights.

    python perf/bench_generate.py [--batch 8] [--prompt-len 64] [--new-tokens 32] [--repeats 3]
    python perf/bench_generate.py --grid [--new-tokens 32] [--repeats 3]

Prints prefill and decode tokens/s of both and the ratios (ours / transformers), measured in the
same run (this machine is noisy: compare ratios, not absolute numbers). CPU, fp32, greedy. `--grid` runs
batch 1/8/64 x prompt 64/512 and prints the whole table.

Both sides are timed the same way, on the wall clock around the whole generate call: prefill = a call
that generates one token, decode = (a call generating --new-tokens) - prefill, over (new tokens - 1) per
prompt. Our engine is given room for the whole batch in one step (max_num_batched_tokens = batch x
prompt), as transformers' forward takes it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moe_pd.config.hf import model_config_to_hf
from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.config.sampling import SamplingConfig
from moe_pd.engine.offline import OfflineEngine
from moe_pd.model.loader import build_model

GRID_BATCHES = (1, 8, 64)
GRID_PROMPTS = (64, 512)


def tiny_config():
    from hydra import compose, initialize_config_module

    from moe_pd.config.store import register_configs, to_config

    register_configs()
    with initialize_config_module("moe_pd.conf", version_base=None):
        return to_config(compose("generate")).model


def transformers_twin(ours):
    import transformers

    hf_cfg = model_config_to_hf(ours.cfg)
    cls = getattr(transformers, hf_cfg["architectures"][0])
    config_cls = getattr(transformers, hf_cfg["architectures"][0].replace("ForCausalLM", "Config"))
    hf_cfg = {k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type")}
    hf = cls(config_cls(**hf_cfg)).float().eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    hf.generation_config.eos_token_id = None
    return hf


def _prefill_and_decode(run, prompts, new_tokens):
    """(prefill tok/s, decode tok/s, generated ids) from two timed calls of run(max_new_tokens)."""
    t0 = time.perf_counter()
    run(1)
    t1 = time.perf_counter()
    out = run(new_tokens)
    t2 = time.perf_counter()
    prefill_s = t1 - t0
    decode_s = max((t2 - t1) - prefill_s, 1e-9)
    num_prompt = sum(len(p) for p in prompts)
    return num_prompt / prefill_s, len(prompts) * (new_tokens - 1) / decode_s, out


def time_hf(hf, prompts, new_tokens):
    ids = torch.tensor(prompts)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)

    def run(n):
        with torch.inference_mode():
            return hf.generate(ids, max_new_tokens=n, **kwargs)[:, ids.shape[1]:].tolist()

    return _prefill_and_decode(run, prompts, new_tokens)


def time_ours(model, prompts, new_tokens):
    tokens = sum(len(p) for p in prompts)
    blocks = len(prompts) * (-(-(max(len(p) for p in prompts) + new_tokens) // 16) + 1)
    engines = {n: OfflineEngine(model, KVCacheConfig(block_size=16, num_blocks=blocks),
                                max_batch_size=len(prompts), max_num_batched_tokens=max(tokens, 4096))
               for n in (1, new_tokens)}  # built outside the timed calls, as transformers' model is

    def run(n):
        out = engines[n].generate(prompts, SamplingConfig(max_new_tokens=n, ignore_eos=True))
        return [c.output_ids for c in out]

    return _prefill_and_decode(run, prompts, new_tokens)


def measure(ours, hf, batch, prompt_len, new_tokens, repeats, seed=0):
    """Median prefill and decode tok/s of both, and whether the greedy tokens agree."""
    prompts = torch.randint(0, 256, (batch, prompt_len), generator=torch.Generator().manual_seed(seed)).tolist()
    time_ours(ours, prompts, 2), time_hf(hf, prompts, 2)  # warm-up: allocator, thread pools
    results = {"ours": [], "transformers": []}
    for _ in range(repeats):  # alternate, so drift on a shared machine hits both alike
        results["ours"].append(time_ours(ours, prompts, new_tokens))
        results["transformers"].append(time_hf(hf, prompts, new_tokens))
    same = results["ours"][0][2] == results["transformers"][0][2]
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in results.items()}
    return med, same


def print_one(med, same):
    print(f"{'':14}{'prefill tok/s':>15}{'decode tok/s':>15}")
    for name, (pf, dc) in med.items():
        print(f"{name:14}{pf:15.0f}{dc:15.0f}")
    ratio = [med["ours"][i] / med["transformers"][i] for i in (0, 1)]
    print(f"{'ratio':14}{ratio[0]:14.2f}x{ratio[1]:14.2f}x")
    print(f"greedy tokens identical: {same}")


def print_grid(rows):
    print("| batch | prompt | prefill ours tok/s | prefill transformers tok/s | prefill ratio | decode ours tok/s "
          "| decode transformers tok/s | decode ratio | greedy tokens identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch, prompt_len, med, same in rows:
        (pf_o, dc_o), (pf_t, dc_t) = med["ours"], med["transformers"]
        print(f"| {batch} | {prompt_len} | {pf_o:.0f} | {pf_t:.0f} | {pf_o / pf_t:.2f}x | {dc_o:.0f} | {dc_t:.0f} "
              f"| {dc_o / dc_t:.2f}x | {same} |")
    worst = min(min(m["ours"][i] / m["transformers"][i] for i in (0, 1)) for _, _, m, _ in rows)
    print(f"lowest ratio: {worst:.2f}x; greedy tokens identical everywhere: {all(r[3] for r in rows)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grid", action="store_true", help="batch 1/8/64 x prompt 64/512, one table")
    args = parser.parse_args()
    torch.manual_seed(0)
    ours = build_model(tiny_config())
    hf = transformers_twin(ours)
    print(f"tiny model, CPU fp32, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"new tokens {args.new_tokens}, median of {args.repeats}")
    if not args.grid:
        print(f"batch {args.batch}, prompt {args.prompt_len}")
        print_one(*measure(ours, hf, args.batch, args.prompt_len, args.new_tokens, args.repeats))
        return
    rows = []
    for prompt_len in GRID_PROMPTS:
        for batch in GRID_BATCHES:
            med, same = measure(ours, hf, batch, prompt_len, args.new_tokens, args.repeats)
            rows.append((batch, prompt_len, med, same))
    print_grid(rows)


if __name__ == "__main__":
    main()
