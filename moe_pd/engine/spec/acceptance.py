"""Which drafted tokens a verification step keeps. Legend: B sequences, K drafts per sequence, V vocab.

The target model scored K + 1 positions per sequence in one forward: its last token and the K drafts d_1..d_K.
Row i of its logits is the target's distribution p_i of the token after draft i (row 0: after the last
token). Each sequence emits its accepted drafts plus one token of its own (the correction where a draft was
rejected, the bonus token after all K were accepted), so every step emits between 1 and K + 1 tokens.

- Greedy: draft i + 1 is kept while it equals argmax p_i; the emitted tokens are exactly the ones K = 0
  decoding would produce.
- Sampling: speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
  Decoding"; Chen et al. 2023): draft d_{i+1}, drawn from the draft's q_i, is kept with probability
  min(1, p_i(d) / q_i(d)); the first rejection emits a token drawn from norm(max(0, p_i - q_i)) and ends the
  sequence's step; after K acceptances the bonus token is drawn from p_K. Every emitted token is then
  distributed exactly as the target's p (tests/unit/test_spec_acceptance.py checks it statistically). p and
  q are the distributions after the request's temperature, top-k and top-p (moe_pd.engine.sampler).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Verdict:
    """Per sequence: how many drafts were accepted, and the tokens to append (accepted drafts, then one)."""

    accepted: list[int]
    tokens: list[list[int]]
    failed: list[bool] = field(default_factory=list)
    """Sequences whose target logits had a position without a finite value (they fail, as a plain step's
    non-finite logits fail their request; MTPSpeculator.verify fills it)."""


def greedy_accept(drafts_BK: torch.Tensor, target_logits_BK1V: torch.Tensor) -> Verdict:
    """Accept drafts while they equal the target's argmax; then append the target's own next token."""
    best_BK1 = target_logits_BK1V.argmax(dim=-1)
    num_drafts = drafts_BK.shape[1]
    match_BK = drafts_BK == best_BK1[:, :num_drafts]
    # accepted = length of the leading run of matches (cumprod stops at the first mismatch)
    accepted_B = match_BK.to(torch.int64).cumprod(dim=1).sum(dim=1)
    accepted, best = accepted_B.tolist(), best_BK1.tolist()
    drafts = drafts_BK.tolist()
    return Verdict(accepted, [drafts[b][:n] + [best[b][n]] for b, n in enumerate(accepted)])


def rejection_sample(drafts_BK: torch.Tensor, draft_probs_BKV: torch.Tensor, target_probs_BK1V: torch.Tensor,
                     generators: list[torch.Generator | None]) -> Verdict:
    """Speculative sampling for each sequence with its own generator (so batching never changes a request's
    tokens). `draft_probs_BKV[b, i]` is the distribution draft i + 1 was drawn from (one-hot for a greedy
    draft); `target_probs_BK1V` the target's, both already filtered and normalised."""
    batch, num_drafts = drafts_BK.shape
    accepted, tokens = [], []
    drafts = drafts_BK.tolist()
    for b in range(batch):
        gen = generators[b]
        p_K1V, q_KV = target_probs_BK1V[b].float().cpu(), draft_probs_BKV[b].float().cpu()
        out: list[int] = []
        for i in range(num_drafts):
            d = drafts[b][i]
            ratio = p_K1V[i, d] / q_KV[i, d] if q_KV[i, d] > 0 else torch.tensor(0.0)
            if torch.rand((), generator=gen) < ratio:  # P(accept) = min(1, p / q)
                out.append(d)
                continue
            residual_V = (p_K1V[i] - q_KV[i]).clamp(min=0)
            if residual_V.sum() <= 0:  # p == q: rejection has probability 0 (rounding only); draw from p
                residual_V = p_K1V[i]
            out.append(int(torch.multinomial(residual_V / residual_V.sum(), 1, generator=gen)))
            break
        else:
            out.append(int(torch.multinomial(p_K1V[num_drafts], 1, generator=gen)))
        accepted.append(len(out) - 1)
        tokens.append(out)
    return Verdict(accepted, tokens)
