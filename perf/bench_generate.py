"""Offline generation throughput of the tiny model: moe_pd vs transformers' generate on the same weights.

    python perf/bench_generate.py [--batch 8] [--prompt-len 64] [--new-tokens 32] [--repeats 3]

Prints prefill and decode tokens/s of both and the ratios (ours / transformers), measured in the
same run (this machine is noisy: compare ratios, not absolute numbers). CPU, fp32, greedy.
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


def time_hf(hf, prompts, new_tokens):
    ids = torch.tensor(prompts)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, **kwargs)
        t1 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new_tokens, **kwargs)
        t2 = time.perf_counter()
    prefill_s = t1 - t0
    decode_s = max((t2 - t1) - prefill_s, 1e-9)
    return ids.numel() / prefill_s, len(prompts) * (new_tokens - 1) / decode_s, out[:, ids.shape[1]:].tolist()


def time_ours(model, prompts, new_tokens):
    engine = OfflineEngine(model, KVCacheConfig(block_size=16, num_blocks=4096), max_batch_size=len(prompts))
    out = engine.generate(prompts, SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True))
    s = engine.stats
    return s.prefill_tokens / s.prefill_s, s.decode_tokens / s.decode_s, [c.output_ids for c in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    ours = build_model(tiny_config())
    hf = transformers_twin(ours)
    prompts = torch.randint(0, 256, (args.batch, args.prompt_len)).tolist()
    time_ours(ours, prompts, 2), time_hf(hf, prompts, 2)  # warm-up: allocator, thread pools
    results = {"ours": [], "transformers": []}
    for _ in range(args.repeats):
        results["ours"].append(time_ours(ours, prompts, args.new_tokens))
        results["transformers"].append(time_hf(hf, prompts, args.new_tokens))
    same = results["ours"][0][2] == results["transformers"][0][2]
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in results.items()}
    print(f"tiny model, CPU fp32, torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, "
          f"prompt {args.prompt_len}, new tokens {args.new_tokens}, median of {args.repeats}")
    print(f"{'':14}{'prefill tok/s':>15}{'decode tok/s':>15}")
    for name, (pf, dc) in med.items():
        print(f"{name:14}{pf:15.0f}{dc:15.0f}")
    ratio = [med["ours"][i] / med["transformers"][i] for i in (0, 1)]
    print(f"{'ratio':14}{ratio[0]:14.2f}x{ratio[1]:14.2f}x")
    print(f"greedy tokens identical: {same}")


if __name__ == "__main__":
    main()
