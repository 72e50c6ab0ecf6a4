"""Writes the trained tiny checkpoint and what it is judged by (see train_tiny.py for the training).

    python -m moe_pd.training.export --work runs/train_tiny --out moe_pd/assets/tiny_dsv3

    <out>/config.json, model.safetensors        the checkpoint: bf16 tensors (the gate's correction bias fp32,
                                                as DeepSeek-V3 stores it), DeepSeek's names, MTP layer N
    <out>/tokenizer.json, tokenizer_config.json the tokenizer (tokenizers / transformers' AutoTokenizer)
    <out>/expert_load.safetensors               routing recorded by moe_pd's EPLB recorder (eplb.init_from,
                                                python -m moe_pd.eplb.replay): `expert_load` [MoE layers + MTP,
                                                experts] over a mixed workload, `expert_load_history`
                                                [windows, layers, experts] over a drifting one (DRIFT)
    <out>/training.json                         loss history, held-out losses, routing skew, greedy samples,
                                                the MTP's first-draft acceptance on greedy continuations
    <out>/loss_curve.png                        training and held-out losses (main and MTP)

Everything judged here is measured on the exported (bf16) weights through moe_pd's serving path (the paged
cache, the loader), not on the training copy.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from moe_pd.config.hf import resolve_model_config
from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.config.model import ModelConfig
from moe_pd.config.sampling import SamplingConfig
from moe_pd.engine.offline import OfflineEngine
from moe_pd.engine.tokenizer import load_tokenizer
from moe_pd.eplb.recorder import ExpertLoadRecorder
from moe_pd.kvcache.paged import AttentionBatch, PagedLatentCache
from moe_pd.model.loader import build_model, save_checkpoint
from moe_pd.parallel.dispatch.local import LocalDispatcher
from moe_pd.training import train_tiny as tt
from moe_pd.training.corpus import KINDS, document
from moe_pd.training.tokenizer import save_tokenizer

log = logging.getLogger("train_tiny")

DEMO_PROMPTS = ["Once upon a time,", "The capital of France is", "Question: What is 3 + 4?\nAnswer:",
                "user: What does a cow say?\nassistant:", "1, 2, 3,", "Monday, Tuesday,",
                "Hello, moe_pd!", "Prefill and decode run on separate clusters because"]
WORKLOAD_DOCS = 256
"""Held-out documents (stream seed 3) whose routing is recorded and whose first halves prompt the samples."""
DRIFT = (6, 4, 12, 4)
"""The drifting workload: each of the 6 kinds of document dominates 4 windows in turn; a window holds 12
documents of its dominant kind and 4 of the mix (a deployment whose traffic shifts between applications)."""


def write_checkpoint(work: Path, out: Path) -> dict:
    model, _ = tt.init_model()
    state = torch.load(work / "state.pt", weights_only=False)
    model.load_state_dict(state["model"])
    model = model.eval().requires_grad_(False).to(torch.bfloat16)
    for moe in model.moe_layers().values():
        moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.float()
    save_checkpoint(model, out)
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_tokenizer(tt.tokenizer(), out, tt.MODEL.max_position_embeddings)
    return state["history"]


def loaded(out: Path, recorder: ExpertLoadRecorder | None = None):
    cfg = resolve_model_config(ModelConfig(path=str(out)))
    dispatcher = LocalDispatcher(cfg.n_routed_experts)
    dispatcher.load_recorder = recorder
    return cfg, build_model(cfg, dispatcher=dispatcher, mtp=True)


def kind_of(index: int) -> str:
    """The corpus kind of held-out document `index` (its generator's first draw picks the kind)."""
    import random

    rng = random.Random(3 * 1_000_003 + index)
    kinds, weights = zip(*KINDS)
    return rng.choices(kinds, weights)[0].__name__.lstrip("_")


def record_routing(out: Path) -> dict:
    """Teacher-forced forwards of held-out documents through the paged cache, main model and MTP layer,
    counted per layer and expert by the EPLB recorder. Two workloads: the mix (WORKLOAD_DOCS documents in
    stream order, as trained) and the drifting windows (DRIFT). The max/mean load of each layer is reported
    for the mix, per window of the drift, and for each kind of document alone."""
    from safetensors.torch import save_file

    cfg = resolve_model_config(ModelConfig(path=str(out)))
    tok = load_tokenizer(cfg)
    recorder = ExpertLoadRecorder(cfg.num_expert_layers, cfg.n_routed_experts, window=1,
                                  first_layer=cfg.first_k_dense_replace)
    _, model = loaded(out, recorder)
    loads: dict[int, torch.Tensor] = {}

    def load_of(i: int) -> torch.Tensor:
        if i not in loads:
            ids = tok.encode(document(3, i)) + [cfg.eos_token_id]
            recorder.begin_step()
            cache = PagedLatentCache(model.num_cache_layers, -(-len(ids) // 16), 16, cfg.kv_lora_rank,
                                     cfg.qk_rope_head_dim)
            batch = AttentionBatch.build([list(range(cache.num_blocks))], [0], [len(ids) - 1], 16)
            with torch.inference_mode():
                states = model(torch.tensor(ids[:-1]), batch, cache)
                model.mtp_forward(torch.tensor(ids[1:]), states, batch, cache)
            loads[i] = recorder.window_load().clone()
        return loads[i]

    total = sum(load_of(i) for i in range(WORKLOAD_DOCS))
    kinds, per_kind, dominant, mixed = DRIFT
    of_kind: dict[str, list[int]] = {}
    i = WORKLOAD_DOCS
    while len(of_kind) < kinds or min(len(v) for v in of_kind.values()) < per_kind * dominant:
        of_kind.setdefault(kind_of(i), []).append(i)
        i += 1
    order = sorted(of_kind)
    windows = torch.stack([
        sum(load_of(j) for j in of_kind[order[w // per_kind]][(w % per_kind) * dominant:][:dominant])
        + sum(load_of(j) for j in range(w * mixed, (w + 1) * mixed))
        for w in range(kinds * per_kind)])
    meta = {"model": "moe_pd tiny_dsv3 (trained)", "num_moe_layers": cfg.num_moe_layers,
            "num_mtp_layers": cfg.num_nextn_predict_layers, "first_layer": cfg.first_k_dense_replace,
            "num_experts": cfg.n_routed_experts, "n_group": cfg.n_group, "hidden_size": cfg.hidden_size,
            "moe_intermediate_size": cfg.moe_intermediate_size,
            "workload": f"expert_load: {WORKLOAD_DOCS} held-out documents of the training corpus (stream seed 3) "
                        f"teacher-forced; expert_load_history: {kinds * per_kind} windows, each {dominant} "
                        f"documents of one kind and {mixed} of the mix, the kind changing every {per_kind} "
                        f"windows ({', '.join(order)})"}
    # moe_pd.eplb.recorder's file format (load_stats reads it), with the windows beside the total
    save_file({"expert_load": total, "expert_load_history": windows}, str(out / "expert_load.safetensors"),
              metadata={"moe_pd": json.dumps(meta)})

    def skew(load_LE: torch.Tensor) -> torch.Tensor:
        load_LE = load_LE.float()
        return load_LE.max(-1).values / load_LE.mean(-1)

    def rounded(values: torch.Tensor) -> list[float]:
        return [round(v, 2) for v in values.tolist()]

    return {"max_over_mean_per_layer": rounded(skew(total)),
            "drift_max_over_mean_per_layer_window_mean": rounded(skew(windows).mean(0)),
            "by_kind": {k: rounded(skew(sum(load_of(j) for j in v))) for k, v in sorted(of_kind.items())}}


def samples_and_acceptance(out: Path) -> dict:
    """Greedy completions of the demo prompts and of held-out half documents (moe_pd's offline engine), and
    the MTP's first-draft acceptance along them: the share of generated positions where the MTP's argmax
    from (main state, next token) equals the token greedy decoding produced one further on."""
    cfg, model = loaded(out)
    tok = load_tokenizer(cfg)
    engine = OfflineEngine(model, KVCacheConfig(block_size=16, num_blocks=512), max_batch_size=16)
    demo = engine.generate([tok.encode(p) for p in DEMO_PROMPTS], SamplingConfig(max_new_tokens=40))
    prompts = []
    for i in range(64):
        ids = tok.encode(document(3, i))
        prompts.append(ids[: max(2, len(ids) // 2)])
    held = engine.generate(prompts, SamplingConfig(max_new_tokens=32, ignore_eos=True))
    hits = total = 0
    for c in held:
        ids = c.prompt_ids + c.output_ids
        cache = PagedLatentCache(model.num_cache_layers, -(-len(ids) // 16), 16, cfg.kv_lora_rank,
                                 cfg.qk_rope_head_dim)
        batch = AttentionBatch.build([list(range(cache.num_blocks))], [0], [len(ids) - 1], 16)
        with torch.inference_mode():
            states = model(torch.tensor(ids[:-1]), batch, cache)
            drafts = model.mtp[0].logits(model.mtp_forward(torch.tensor(ids[1:]), states, batch, cache)).argmax(-1)
        # row p drafts the token at p + 2; count rows whose target is a generated token
        first = len(c.prompt_ids) - 1
        hits += int((drafts[first:-1] == torch.tensor(ids[first + 2:])).sum())
        total += len(ids) - 2 - first
    return {"samples": {p: tok.decode(c.output_ids) for p, c in zip(DEMO_PROMPTS, demo)},
            "mtp_first_draft_acceptance": round(hits / total, 4), "acceptance_positions": total}


def plot(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values: list[float], width: int = 25) -> list[float]:
        return [sum(values[max(0, i - width + 1): i + 1]) / len(values[max(0, i - width + 1): i + 1])
                for i in range(len(values))]

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["step"], smooth(history["loss"]), label="next token (train, smoothed)")
    ax.plot(history["step"], smooth(history["mtp_loss"]), label="MTP, token after next (train, smoothed)")
    ax.plot(history["eval_step"], history["eval_loss"], "o", ms=3, label="next token (held out)")
    ax.plot(history["eval_step"], history["eval_mtp_loss"], "s", ms=3, label="MTP (held out)")
    ax.set_xlabel("step (16 x 256 tokens)")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_yscale("log")
    ax.set_title("moe_pd tiny_dsv3: training on the generated corpus (CPU)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def export(work: Path, out: Path) -> None:
    history = write_checkpoint(work, out)
    plot(history, out / "loss_curve.png")
    report = {"steps": len(history["step"]), "train_seconds": round(history["seconds"]),
              "final_train_loss": round(history["loss"][-1], 4),
              "final_train_mtp_loss": round(history["mtp_loss"][-1], 4),
              "held_out_loss": round(history["eval_loss"][-1], 4),
              "held_out_mtp_loss": round(history["eval_mtp_loss"][-1], 4)}
    report["routing"] = record_routing(out)
    report.update(samples_and_acceptance(out))
    report["history"] = {k: ([round(x, 4) for x in v] if isinstance(v, list) else v) for k, v in history.items()}
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    log.info("exported to %s: %s", out, json.dumps({k: v for k, v in report.items() if k != "history"}, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/train_tiny"), help="train_tiny's --work folder")
    parser.add_argument("--out", type=Path, required=True, help="where the checkpoint goes")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    state = torch.load(args.work / "state.pt", weights_only=False)
    if state["step"] < tt.STEPS:
        parser.error(f"{args.work} holds step {state['step']} of {tt.STEPS}: run train_tiny until it prints done")
    export(args.work, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
