"""Next-token selection. Legend: B sequences, V vocab.

Greedy rows take the argmax. Sampled rows apply temperature, then top-k, then top-p, and draw from
their own request's generator, so a request's tokens do not depend on what it was batched with.
"""

from __future__ import annotations

import torch

from moe_pd.engine.core.request import SamplingParams


def filter_logits(logits_V: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits with everything outside top-k / top-p set to -inf."""
    logits_V = logits_V.float() / p.temperature
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


def sample(logits_BV: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    greedy_B = logits_BV.argmax(dim=-1).tolist()
    out = []
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            out.append(greedy_B[row])
            continue
        probs_V = filter_logits(logits_BV[row], p).softmax(-1).cpu()
        out.append(int(torch.multinomial(probs_V, 1, generator=gen)))
    return out
