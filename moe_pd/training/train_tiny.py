"""Trains the repository's tiny DeepSeek-V3-shaped checkpoint (moe_pd/assets/tiny_dsv3/) on a CPU.

    python -m moe_pd.training.train_tiny --work runs/train_tiny --minutes 4   # repeat until it says done
    python -m moe_pd.training.export --work runs/train_tiny --out moe_pd/assets/tiny_dsv3

Each call resumes from `<work>/state.pt`, trains for at most `--minutes`, and saves at a step boundary, so
the training runs in bounded chunks; the data of step s is a pure function of s (moe_pd.training.corpus),
nothing else draws random numbers and torch runs its deterministic kernels, so chunked and uninterrupted
runs give the same weights, bit for bit, on the same machine and torch build. `moe_pd.training.export` writes the
checkpoint (bf16, DeepSeek's names, the MTP module as layer
num_hidden_layers), the tokenizer, the loss curve and the routing statistics (moe_pd.training.export).
The model: MODEL below; the objective: next-token cross-entropy plus 0.3 x the MTP module's (DeepSeek-V3's
lambda for its first 10T tokens); routing balanced without an auxiliary loss by DeepSeek-V3's bias update
(each step, every expert's e_score_correction_bias moves by BIAS_RATE towards the mean load).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moe_pd.config.model import ModelConfig, RopeScalingConfig
from moe_pd.eplb.recorder import ExpertLoadRecorder
from moe_pd.model.loader import RandomSource, build_model
from moe_pd.model.transformer import DeepseekForCausalLM
from moe_pd.parallel.dispatch.local import LocalDispatcher
from moe_pd.training.corpus import documents
from moe_pd.training.forward import losses
from moe_pd.training.tokenizer import train_tokenizer

log = logging.getLogger("train_tiny")

SEED = 0
TOKENIZER_DOCS = 20_000
"""Documents (stream seed 1) the BPE merges are learnt from; training reads stream seed 0."""
VOCAB = 1024
MODEL = ModelConfig(
    vocab_size=VOCAB, hidden_size=128, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=4,
    num_nextn_predict_layers=1, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, n_shared_experts=1,
    num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5, max_position_embeddings=1024,
    rope_scaling=RopeScalingConfig(factor=4.0, original_max_position_embeddings=256, mscale=1.0, mscale_all_dim=1.0),
    bos_token_id=0, eos_token_id=1, init_seed=SEED, init_std=0.02)
BATCH, SEQ = 16, 256
"""Sequences per step and tokens per sequence (plus one for the shifted targets)."""
DOCS_PER_SEQ = 64
STEPS, WARMUP, PEAK_LR, FINAL_LR = 1500, 100, 3e-3, 3e-4
MTP_WEIGHT = 0.3
BIAS_RATE = 2e-3
EVAL_EVERY = 50


@functools.cache
def tokenizer() -> Tokenizer:
    return train_tokenizer(documents(1, TOKENIZER_DOCS), VOCAB)


def _packed(tok: Tokenizer, seed: int, first: int) -> list[int]:
    """SEQ + 1 tokens: documents (bos, text, eos) of stream `seed` from document `first` on, in batches of 8
    until they fill the sequence (at most DOCS_PER_SEQ documents), the last one cut."""
    ids: list[int] = []
    for start in range(first, first + DOCS_PER_SEQ, 8):
        for enc in tok.encode_batch(list(documents(seed, 8, start)), add_special_tokens=True):
            ids += enc.ids + [MODEL.eos_token_id]
        if len(ids) > SEQ:
            return ids[: SEQ + 1]
    raise RuntimeError(f"{DOCS_PER_SEQ} documents from {first} hold {len(ids)} tokens, fewer than {SEQ + 1}")


def batch(tok: Tokenizer, step: int) -> torch.Tensor:
    """[BATCH, SEQ + 1] token ids of step `step`: sequence j packs documents from (step * BATCH + j) *
    DOCS_PER_SEQ on (stream seed SEED)."""
    return torch.tensor([_packed(tok, SEED, (step * BATCH + j) * DOCS_PER_SEQ) for j in range(BATCH)])


def held_out(tok: Tokenizer) -> torch.Tensor:
    """A fixed evaluation batch from the stream with seed 2 (never trained on)."""
    return torch.tensor([_packed(tok, 2, j * DOCS_PER_SEQ) for j in range(BATCH)])


def init_model() -> tuple[DeepseekForCausalLM, ExpertLoadRecorder]:
    dispatcher = LocalDispatcher(MODEL.n_routed_experts)
    model = build_model(MODEL, dispatcher=dispatcher, source=RandomSource(SEED, MODEL.init_std), mtp=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
        for moe in model.moe_layers().values():
            moe.gate.e_score_correction_bias.zero_()
    recorder = ExpertLoadRecorder(MODEL.num_expert_layers, MODEL.n_routed_experts, window=1,
                                  first_layer=MODEL.first_k_dense_replace)
    dispatcher.load_recorder = recorder
    return model.train().requires_grad_(True), recorder


def learning_rate(step: int) -> float:
    if step < WARMUP:
        return PEAK_LR * (step + 1) / WARMUP
    done = (step - WARMUP) / max(STEPS - WARMUP, 1)
    return FINAL_LR + (PEAK_LR - FINAL_LR) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def optimizer(model: DeepseekForCausalLM) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=PEAK_LR, betas=(0.9, 0.95), eps=1e-8)


def update_bias(model: DeepseekForCausalLM, recorder: ExpertLoadRecorder) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing: overloaded experts' bias down, underloaded up."""
    load_LE = recorder.window_load().float()
    with torch.no_grad():
        for row, moe in enumerate(model.moe_layers().values()):
            load_E = load_LE[row]
            moe.gate.e_score_correction_bias += BIAS_RATE * torch.sign(load_E.mean() - load_E)


def train(work: Path, minutes: float, max_steps: int | None = None) -> bool:
    """Trains from `<work>/state.pt` (or from scratch) for at most `minutes` (and `max_steps` steps when
    given), then saves; True when STEPS are done."""
    # deterministic kernels (the embedding's and the MoE scatter's backward accumulate in a fixed order):
    # without them two runs on the same machine differ in the last bits; no slower here
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(work, minutes, max_steps)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(work: Path, minutes: float, max_steps: int | None) -> bool:
    torch.manual_seed(SEED)
    work.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    model, recorder = init_model()
    opt = optimizer(model)
    state_file = work / "state.pt"
    history: dict[str, list] = {"step": [], "loss": [], "mtp_loss": [], "eval_step": [], "eval_loss": [],
                                "eval_mtp_loss": [], "seconds": 0.0}
    step = 0
    if state_file.is_file():
        state = torch.load(state_file, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
    evaluation = held_out(tok)
    started, first = time.monotonic(), step
    last = STEPS if max_steps is None else min(STEPS, step + max_steps)
    while step < last and time.monotonic() - started < 60 * minutes:
        for group in opt.param_groups:
            group["lr"] = learning_rate(step)
        recorder.begin_step()
        main, extra = losses(model, batch(tok, step))
        opt.zero_grad(set_to_none=True)
        (main + MTP_WEIGHT * extra).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        update_bias(model, recorder)
        step += 1
        history["step"].append(step)
        history["loss"].append(main.item())
        history["mtp_loss"].append(extra.item())
        if step % EVAL_EVERY == 0 or step == STEPS:
            with torch.no_grad():
                recorder.begin_step()
                eval_main, eval_extra = losses(model, evaluation)
            history["eval_step"].append(step)
            history["eval_loss"].append(eval_main.item())
            history["eval_mtp_loss"].append(eval_extra.item())
            log.info("step %d: loss %.3f, MTP loss %.3f; held-out %.3f, %.3f (%.1f s/step)", step, main.item(),
                     extra.item(), eval_main.item(), eval_extra.item(), (time.monotonic() - started) / (step - first))
    history["seconds"] += time.monotonic() - started
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "history": history},
               state_file)
    (work / "history.json").write_text(json.dumps(history))
    log.info("saved step %d of %d to %s (%.0f s of training so far)", step, STEPS, state_file, history["seconds"])
    return step >= STEPS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/train_tiny"))
    parser.add_argument("--minutes", type=float, default=5.0, help="train at most this long, then save")
    parser.add_argument("--steps", type=int, help="train at most this many steps, then save")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    done = train(args.work, args.minutes, args.steps)
    print("done" if done else "not done: run again to continue")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
