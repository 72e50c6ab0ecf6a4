"""An engine step with speculative decoding (LLMEngine with num_draft_tokens = K > 0).

Legend: T rows, B sequences, D hidden.

The scheduler's plan has two kinds of item: plain ones (prefill chunks, and decodes without drafts) and
verifications (a decoding request with its K drafts). A step runs, in this order and on every EP rank (an
idle rank with empty batches, so every all-to-all stays paired):

1. the main model over the plain items; sampling where a chunk reached its sequence's end;
2. the MTP layer over the same rows (row t takes the token after its position: the next prompt token, or
   the token just sampled), which fills its cache rows and gives the sampled sequences their first draft;
3. the verification forward, acceptance and the MTP extend (MTPSpeculator.verify);
4. one chain of K - 1 MTP rows for every sequence that sampled in 1 or verified in 3.

A one-process engine skips the forwards it has no rows for. The emitted tokens go back to the scheduler,
the new drafts onto the requests; SpecStats counts acceptance for the generate summary and /metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moe_pd.engine.core.request import Request
from moe_pd.engine.core.scheduler import Scheduled
from moe_pd.engine.spec.mtp_step import Drafts, MTPSpeculator


@dataclass
class SpecStats:
    num_draft_tokens: int = 0
    verifications: int = 0
    """Sequence-steps that verified their drafts."""
    accepted: int = 0
    """Drafts accepted in all."""
    accepted_at: list[int] = field(default_factory=list)
    """Per draft position, the verifications that accepted it."""

    def __post_init__(self) -> None:
        self.accepted_at = self.accepted_at or [0] * self.num_draft_tokens

    def record(self, accepted: list[int]) -> None:
        self.verifications += len(accepted)
        self.accepted += sum(accepted)
        for n in accepted:
            for j in range(n):
                self.accepted_at[j] += 1

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a verification emits on average (accepted drafts + the target's own): 1 to K + 1."""
        return 1 + self.accepted / self.verifications if self.verifications else 0.0

    @property
    def acceptance_rates(self) -> list[float]:
        """Per draft position, the share of verifications that accepted it."""
        return [n / self.verifications if self.verifications else 0.0 for n in self.accepted_at]

    @staticmethod
    def merged(parts: list[SpecStats]) -> SpecStats:
        """The counts of several engines (the ranks of an instance) together."""
        total = SpecStats(parts[0].num_draft_tokens if parts else 0)
        for part in parts:
            total.verifications += part.verifications
            total.accepted += part.accepted
            total.accepted_at = [a + b for a, b in zip(total.accepted_at, part.accepted_at, strict=True)]
        return total

    def summary(self) -> str:
        rates = ", ".join(f"{r:.3f}" for r in self.acceptance_rates)
        return (f"{self.verifications} verifications, mean acceptance length {self.mean_acceptance_length:.3f}, "
                f"acceptance rate per draft position [{rates}]")


class SpeculativeStep:
    def __init__(self, speculator: MTPSpeculator, plain: Callable[[list[Scheduled]], tuple], always_run: bool) -> None:
        """`plain(items)`: the engine's forward and sampling over plain items (LLMEngine._run_plain: hidden
        states, batch, request id -> token, failed requests); `always_run`: run every forward even with no
        rows (EP)."""
        self.spec, self.plain, self.always_run = speculator, plain, always_run
        self.model, self.cache, self.device = speculator.model, speculator.cache, speculator.device
        self.stats = SpecStats(speculator.num_drafts)

    def run(self, scheduled: list[Scheduled]) -> tuple[dict[str, list[int]], list[Request]]:
        """Runs the step's forwards; returns the emitted tokens of every request that sampled or verified (and
        leaves each of them its next drafts: Request.drafts, draft_probs), and the requests no token could be
        sampled for (non-finite logits)."""
        plain = [s for s in scheduled if not s.drafts]
        verifying = [s for s in scheduled if s.drafts]
        emitted: dict[str, list[int]] = {}
        failed: list[Request] = []
        starts: list[tuple[Scheduled, int, torch.Tensor]] = []  # (item, position, MTP state) to draft from
        with torch.inference_mode():
            if plain or self.always_run:
                starts += self._plain(plain, emitted, failed)
            if verifying or self.always_run:
                starts += self._verify(verifying, emitted, failed)
            if starts or self.always_run:
                self._draft(starts)
        return emitted, failed

    def _plain(self, items: list[Scheduled], emitted: dict[str, list[int]], failed: list[Request]) -> list:
        states_TD, batch, sampled, no_token = self.plain(items)
        failed += no_token
        emitted.update({rid: [t] for rid, t in sampled.items()})
        rows = [i for i, s in enumerate(items) if s.seq.request_id in sampled]
        last_T = batch.query_starts_B + batch.query_lens_B - 1
        # the token after each row: the sequence's next one, or for its last row the token just sampled (a
        # failed request's last row repeats its token: junk it never reads)
        next_ids = [t for s in items for t in s.seq.token_slice(s.context + 1, s.context + s.num_new + 1)
                    + ([sampled.get(s.seq.request_id, s.seq.token_slice(s.context + s.num_new - 1,
                                                                         s.context + s.num_new)[0])]
                       if s.samples else [])]
        mtp_TD = self.model.mtp_forward(torch.tensor(next_ids, dtype=torch.int64, device=self.device), states_TD,
                                        batch, self.cache)
        return [(items[i], items[i].context + items[i].num_new - 1, mtp_TD[last_T[i]]) for i in rows]

    def _verify(self, items: list[Scheduled], emitted: dict[str, list[int]], failed: list[Request]) -> list:
        reqs = [s.seq for s in items]
        k, vocab = self.spec.num_drafts, self.model.cfg.vocab_size
        tokens_BK = torch.tensor([r.drafts for r in reqs], dtype=torch.int64).view(len(reqs), k)
        probs = None
        if any(r.draft_probs is not None for r in reqs):
            one_hot = torch.nn.functional.one_hot
            probs = torch.stack([r.draft_probs if r.draft_probs is not None else one_hot(torch.tensor(r.drafts),
                                                                                            vocab).float()
                                 for r in reqs])
        verdict, states_BD, positions = self.spec.verify(
            [r.block_table for r in reqs], [r.num_tokens for r in reqs],
            [r.token_slice(r.num_tokens - 1, r.num_tokens)[0] for r in reqs],
            Drafts(tokens_BK, probs), [r.params for r in reqs], [r.generator for r in reqs])
        ok = [b for b, bad in enumerate(verdict.failed) if not bad]
        failed += [reqs[b] for b, bad in enumerate(verdict.failed) if bad]
        self.stats.record([verdict.accepted[b] for b in ok])
        emitted.update({reqs[b].request_id: verdict.tokens[b] for b in ok})
        return [(items[b], positions[b], states_BD[b]) for b in ok]

    def _draft(self, starts: list) -> None:
        reqs = [item.seq for item, _, _ in starts]
        states_BD = torch.stack([s for _, _, s in starts]) if starts else \
            torch.zeros(0, self.model.cfg.hidden_size, device=self.device, dtype=self.cache.kv_LPSW.dtype)
        drafts = self.spec.draft([r.block_table for r in reqs], [pos for _, pos, _ in starts], states_BD,
                                 [r.params for r in reqs], [r.generator for r in reqs])
        for b, req in enumerate(reqs):
            req.drafts = drafts.tokens_BK[b].tolist()
            req.draft_probs = None if drafts.probs_BKV is None else drafts.probs_BKV[b]
