"""Next-token selection. Legend: B sequences, V vocab.

Penalties first (OpenAI's presence and frequency penalties, over the tokens generated so far), then greedy
rows take the argmax; sampled rows apply temperature, then top-k, then top-p, and draw from their own
request's generator, so a request's tokens do not depend on what it was batched with.

Guards, so that no request's parameters or logits can raise inside a rank: temperatures below
MIN_TEMPERATURE are greedy (SamplingParams.greedy), NaN logits count as -inf, and a row with no finite logit
left is a failed row (None) that fails its request alone; any other error while sampling a row does the same.
"""

from __future__ import annotations

import logging

import torch

from moe_pd.engine.core.request import Logprob, SamplingParams

log = logging.getLogger(__name__)


def apply_penalties(logits_V: torch.Tensor, output_ids: list[int], p: SamplingParams) -> torch.Tensor:
    """OpenAI's penalties: logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0), with
    count over the tokens generated so far (the prompt does not count)."""
    if not p.penalized or not output_ids:
        return logits_V
    counts_V = torch.bincount(torch.tensor(output_ids, device=logits_V.device), minlength=logits_V.shape[-1])
    counts_V = counts_V[: logits_V.shape[-1]].to(torch.float32)
    return logits_V.float() - p.frequency_penalty * counts_V - p.presence_penalty * (counts_V > 0).float()


def filter_logits(logits_V: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits with everything outside top-k / top-p set to -inf."""
    logits_V = logits_V.float() / max(p.temperature, 1e-5)
    logits_V = torch.nan_to_num(logits_V, nan=float("-inf"), posinf=torch.finfo(torch.float32).max,
                                neginf=float("-inf"))
    if 0 < p.top_k < logits_V.shape[-1]:
        kth = torch.topk(logits_V, p.top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_V, order_V = torch.sort(logits_V, descending=True, stable=True)
        probs_V = sorted_V.softmax(-1)
        # Drop a token when the tokens before it already reach top_p (the first one always stays).
        drop_V = (probs_V.cumsum(-1) - probs_V) >= p.top_p
        logits_V = logits_V.scatter(0, order_V, sorted_V.masked_fill(drop_V, float("-inf")))
    return logits_V


def _sample_row(logits_V: torch.Tensor, p: SamplingParams, gen: torch.Generator | None,
                output_ids: list[int]) -> int | None:
    logits_V = apply_penalties(logits_V, output_ids, p).float()
    logits_V = logits_V.masked_fill(logits_V.isnan(), float("-inf"))
    if not bool(torch.isfinite(logits_V).any()) and not bool((logits_V == float("inf")).any()):
        return None  # nothing to choose from
    if p.greedy:
        return int(logits_V.argmax())
    probs_V = filter_logits(logits_V, p).softmax(-1).cpu()
    if not bool(torch.isfinite(probs_V).all()) or float(probs_V.sum()) <= 0:
        return int(logits_V.argmax())  # every finite logit overflowed: the limit of sampling is the argmax
    return int(torch.multinomial(probs_V, 1, generator=gen))


def sample(logits_BV: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           outputs: list[list[int]] | None = None) -> list[int | None]:
    """One token per row; None where the row cannot be sampled (its request fails, the others go on).
    `outputs`: each row's generated tokens so far (for penalties)."""
    outputs = outputs if outputs is not None else [[] for _ in params]
    plain = [i for i, p in enumerate(params) if p.greedy and not p.penalized]
    greedy_B = logits_BV[plain].float().nan_to_num(nan=float("-inf")).argmax(dim=-1).tolist() if plain else []
    fast = dict(zip(plain, greedy_B))
    out: list[int | None] = []
    for row, (p, gen, done) in enumerate(zip(params, generators, outputs, strict=True)):
        try:
            if row in fast:
                finite = bool(torch.isfinite(logits_BV[row]).any())
                out.append(fast[row] if finite else None)
            else:
                out.append(_sample_row(logits_BV[row], p, gen, done))
        except Exception:  # a request's own sampling must never take the rank down
            log.exception("sampling row %d (%s) failed", row, p)
            out.append(None)
    return out


def logprobs(logits_BV: torch.Tensor, tokens: list[int], top: list[int]) -> list[Logprob]:
    """Each row's token log-probability under the raw logits (log-softmax, as vLLM's raw logprobs) and its
    `top[row]` best alternatives."""
    logp_BV = torch.nan_to_num(logits_BV.float(), nan=float("-inf")).log_softmax(-1)
    chosen_B = logp_BV.gather(1, torch.tensor(tokens, device=logp_BV.device).unsqueeze(1)).squeeze(1).tolist()
    k = min(max(top, default=0), logp_BV.shape[-1])
    values_BK, ids_BK = (logp_BV.topk(k, dim=-1) if k else (None, None))
    out = []
    for row, (token, value) in enumerate(zip(tokens, chosen_B)):
        alts = ()
        if top[row]:
            alts = tuple(zip(ids_BK[row, : top[row]].tolist(), values_BK[row, : top[row]].tolist()))
        out.append(Logprob(token, value, alts))
    return out
