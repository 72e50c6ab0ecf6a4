"""Offline generation: `python -m moe_pd.generate prompts='[hello]' sampling.max_new_tokens=16`.

Reads prompts (text, token ids or a JSON-lines file), generates with continuous batching over the paged
latent cache, and writes one JSON line per prompt, in prompt order, to stdout or `output=FILE`.
Every knob is a typed config field (conf/generate.yaml); `--cfg job` prints the composed config.

Under torchrun (`torchrun --nproc-per-node=R -m moe_pd.generate ...`) the R ranks form one EP group with
data-parallel attention: prompts are spread over the ranks balanced by tokens, every rank holds 1/R of
the routed experts, and rank 0 writes the results in prompt order.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from moe_pd.config.errors import ConfigError, exit_on
from moe_pd.config.generate import GenerateConfig
from moe_pd.config.hf import resolve_model_config
from moe_pd.config.store import register_configs, to_config
from moe_pd.engine.instance import graphs_wanted, rank_group
from moe_pd.engine.offline import OfflineEngine, PromptError, check_prompts
from moe_pd.engine.spec.engine_step import SpecStats
from moe_pd.engine.tokenizer import Tokenizer, load_tokenizer
from moe_pd.log import setup_logging
from moe_pd.model.loader import CheckpointError
from moe_pd.parallel.state import env_world
from moe_pd.parallel.step_sync import balance_by_tokens

log = logging.getLogger("moe_pd.generate")


def read_prompts(cfg: GenerateConfig, tokenizer: Tokenizer | None) -> tuple[list[list[int]], list[str | None]]:
    texts: list[str | None] = []
    ids: list[list[int]] = []
    entries: list[dict] = [{"prompt": p} for p in cfg.prompts] + [{"prompt_ids": p} for p in cfg.prompt_ids]
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise PromptError(f"prompts_file={cfg.prompts_file!r}: no such file")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise PromptError(f"{path}:{n}: not JSON ({exc.msg})") from None
    for n, entry in enumerate(entries):
        if "prompt_ids" in entry:
            ids.append([int(t) for t in entry["prompt_ids"]])
            texts.append(None)
        elif "prompt" in entry:
            if tokenizer is None:
                raise PromptError(f"prompt {n} is text but the checkpoint has no tokenizer.json; give prompt_ids")
            if not entry["prompt"]:
                raise PromptError(f"prompt {n} is empty")
            ids.append(tokenizer.encode(entry["prompt"]))
            texts.append(entry["prompt"])
        else:
            raise PromptError(f"prompt {n}: needs a 'prompt' or 'prompt_ids' key")
    if not ids:
        raise PromptError("no prompts: set prompts=[...], prompt_ids=[[...]] or prompts_file=FILE")
    return ids, texts


def run(cfg: GenerateConfig, run_dir: str | None = None) -> list[dict]:
    """Generates for every prompt; returns the JSON records on rank 0 and [] on the other ranks."""
    model_cfg = resolve_model_config(cfg.model)
    tokenizer = load_tokenizer(model_cfg)
    prompt_ids, texts = read_prompts(cfg, tokenizer)
    check_prompts(prompt_ids, model_cfg.vocab_size, model_cfg.max_position_embeddings)
    with rank_group(cfg, "generate", run_dir, model_cfg) as group:
        state = group.state
        owner = balance_by_tokens([len(p) for p in prompt_ids], state.dp_size)
        mine = [i for i, r in enumerate(owner) if r == state.dp_rank]
        engine = OfflineEngine(group.model, cfg.kvcache, cfg.max_batch_size, state.device, group.sync, cfg.overlap,
                               cfg.max_num_batched_tokens,
                               decode_graphs=graphs_wanted(cfg.runtime, state, group.model),
                               num_draft_tokens=cfg.speculative.num_draft_tokens)
        completions = engine.generate([prompt_ids[i] for i in mine], cfg.sampling, indices=mine)
        s = engine.stats
        log.info("prefill %d tokens in %.3f s (%.1f tok/s); decode %d tokens in %.3f s (%.1f tok/s) on rank %d",
                 s.prefill_tokens, s.prefill_s, s.prefill_tokens / max(s.prefill_s, 1e-9),
                 s.decode_tokens, s.decode_s, s.decode_tokens / max(s.decode_s, 1e-9), state.rank)
        if s.spec is not None:
            spec = gather_to_leader(state, [s.spec], sort=False)
            if spec:
                log.info("speculative decoding (K=%d), %d rank(s): %s", s.spec.num_draft_tokens, len(spec),
                         SpecStats.merged(spec).summary())
        if group.eplb is not None and cfg.eplb.dump_stats:
            group.eplb.dump(cfg.eplb.dump_stats)
        completions = gather_to_leader(state, completions)
    return [
        {
            "index": c.index,
            "prompt": texts[c.index],
            "prompt_ids": c.prompt_ids,
            "output_ids": c.output_ids,
            "text": tokenizer.decode(c.output_ids) if tokenizer else None,
            "finish_reason": c.finish_reason,
            "timing": {"ttft_s": round(c.ttft_s, 6), "decode_s": round(c.decode_s, 6)},
        }
        for c in completions
    ]


def gather_to_leader(state, completions: list, sort: bool = True) -> list:
    """Every rank's completions, in prompt order (`sort`; else rank order), on rank 0 (others get [])."""
    if state.world_size == 1:
        return completions
    import torch.distributed as dist

    gathered: list = [None] * state.world_size if state.is_leader else None
    dist.gather_object(completions, gathered, dst=0, group=state.group)
    if not state.is_leader:
        return []
    every = [c for part in gathered for c in part]
    return sorted(every, key=lambda c: c.index) if sort else every


@hydra.main(config_path="pkg://moe_pd.conf", config_name="generate", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    with exit_on(ConfigError, PromptError, CheckpointError):
        cfg = to_config(dict_cfg)
        setup_logging(cfg.runtime.log_level)
        records = run(cfg, HydraConfig.get().runtime.output_dir)
    if env_world()[0] != 0:
        return
    out = open(cfg.output, "w") if cfg.output else sys.stdout
    try:
        for record in records:
            out.write(json.dumps(record) + "\n")
    finally:
        if cfg.output:
            out.close()


register_configs()

if __name__ == "__main__":
    main()
