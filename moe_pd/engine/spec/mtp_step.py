"""The model side of MTP speculative decoding: draft K tokens in a chain, verify K + 1 positions in one
forward, keep the accepted ones, redraft. Legend: B sequences, K drafts, T rows, D hidden, V vocab.

A sequence of L tokens in decode: the main model's cache holds positions 0..L-2; its last token t_{L-1} and
K drafts d_1..d_K wait. The MTP module's cache row of position p is computed from the main state of p and
the token at p + 1 (moe_pd.model.mtp), so it holds rows 0..L-3, and row L-2 is the one the first draft came
from. One step, every forward with a fixed shape so that all EP ranks pair their all-to-alls and a CUDA
graph can capture it (SGLang and vLLM run DeepSeek's MTP the same way, as an EAGLE-style chain):

1. verify: the main model over t_{L-1}, d_1..d_K at positions L-1..L-1+K (one AttentionBatch with
   verify=True: K + 1 causal queries per sequence over the paged cache) -> K + 1 distributions;
2. accept (moe_pd.engine.spec.acceptance): n drafts kept, plus one token of the target's -> L' = L + n + 1;
3. extend: the MTP module over the same K + 1 rows, row i taking the token at position L + i (accepted
   drafts, then the target's token, then padding), which rewrites its cache rows L-1..L'-2 from true main
   states; its row n gives the first draft of the next step;
4. chain: K - 1 more MTP steps, one row per sequence at positions L'-1..L'+K-3, each taking the previous
   MTP state and the draft just made.

Rows past a sequence's acceptance (main rows L'..L+K-1, MTP rows past L'-2) hold junk that nothing reads
before it is overwritten; the caller rolls the pages back (BlockManager.truncate). Before a step the caller's
block tables must cover position L + 2K - 2 (the furthest chain row when all K drafts are accepted).
After prefill, `after_prefill` runs step 3 and 4 from the prompt's rows, so decode speculates from its first
step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from moe_pd.engine.sampler import SamplingParams, filter_logits
from moe_pd.engine.spec.acceptance import Verdict, greedy_accept, rejection_sample
from moe_pd.kvcache.paged import AttentionBatch, PagedLatentCache
from moe_pd.model.transformer import DeepseekForCausalLM


@dataclass
class Drafts:
    tokens_BK: torch.Tensor
    probs_BKV: torch.Tensor | None
    """The distributions the drafts were drawn from (rejection sampling needs them); None when every
    sequence is greedy."""


def tables_cover(tables: Sequence[Sequence[int]], lengths: Sequence[int], num_drafts: int, block_size: int) -> bool:
    """Whether every block table holds the pages a step needs (positions up to L + 2K - 2)."""
    return all(len(t) * block_size >= n + 2 * num_drafts - 1 for t, n in zip(tables, lengths, strict=True))


class MTPSpeculator:
    """Runs steps 1-4 for a batch of sequences; the caller owns pages, lengths and stopping."""

    def __init__(self, model: DeepseekForCausalLM, cache: PagedLatentCache, num_drafts: int,
                 device: torch.device | str = "cpu",
                 forward: Callable[[torch.Tensor, AttentionBatch], torch.Tensor] | None = None) -> None:
        """`forward(ids, batch)`: the main model's forward over the cache (default: model(ids, batch, cache);
        the engine passes its own, which may overlap micro-batches)."""
        if num_drafts < 1:
            raise ValueError(f"num_drafts={num_drafts}: must be >= 1")
        if not len(model.mtp):
            raise ValueError("the model was built without its MTP layer (build_model(mtp=True))")
        if cache.kv_LPSW.shape[0] < model.num_cache_layers:
            raise ValueError(f"the cache has {cache.kv_LPSW.shape[0]} layers; the model with its MTP layer writes "
                             f"{model.num_cache_layers}")
        self.model, self.cache, self.num_drafts, self.device = model, cache, num_drafts, device
        self.forward = forward or (lambda ids_T, batch: model(ids_T, batch, cache))

    # drafting -----------------------------------------------------------------------------------------------
    def _pick(self, logits_BV: torch.Tensor, params: Sequence[SamplingParams],
              generators: Sequence[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Greedy sequences draft the MTP's argmax; sampling ones draw from its filtered distribution with
        their own generator. Returns (tokens [B], distributions [B, V] or None when all are greedy)."""
        tokens_B = logits_BV.argmax(dim=-1)
        if all(p.greedy for p in params):
            return tokens_B, None
        probs_BV = torch.zeros_like(logits_BV, dtype=torch.float32)
        for b, (p, gen) in enumerate(zip(params, generators, strict=True)):
            if p.greedy:
                probs_BV[b, tokens_B[b]] = 1.0
                continue
            probs_BV[b] = filter_logits(logits_BV[b], p).softmax(-1)
            tokens_B[b] = torch.multinomial(probs_BV[b].cpu(), 1, generator=gen).to(tokens_B.device)[0]
        return tokens_B, probs_BV

    def draft(self, tables: Sequence[Sequence[int]], positions: Sequence[int], states_BD: torch.Tensor,
              params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]) -> Drafts:
        """Steps 3's pick and 4: `states_BD` are the MTP states of each sequence's row at `positions`; draft 1
        comes from their logits, drafts 2..K from one MTP row each at the following positions."""
        tokens, probs = [], []
        token_B, prob_BV = self._pick(self.model.mtp[0].logits(states_BD), params, generators)
        for j in range(1, self.num_drafts + 1):
            tokens.append(token_B)
            probs.append(prob_BV)
            if j == self.num_drafts:
                break
            batch = AttentionBatch.build(tables, [p + j for p in positions], [1] * len(positions),
                                         self.cache.block_size, self.device)
            states_BD = self.model.mtp_forward(token_B, states_BD, batch, self.cache)
            token_B, prob_BV = self._pick(self.model.mtp[0].logits(states_BD), params, generators)
        tokens_BK = torch.stack(tokens, dim=1)
        probs_BKV = None if all(p is None for p in probs) else torch.stack(
            [p if p is not None else torch.nn.functional.one_hot(t, self.model.cfg.vocab_size).float()
             for p, t in zip(probs, tokens)], dim=1)
        return Drafts(tokens_BK, probs_BKV)

    def after_prefill(self, batch: AttentionBatch, main_states_TD: torch.Tensor, next_ids_T: torch.Tensor,
                      finishing: Sequence[int], params: Sequence[SamplingParams],
                      generators: Sequence[torch.Generator | None]) -> Drafts:
        """The MTP module over a prefill step's rows (row t takes the token after its position: the prompt's
        next token, or for a sequence's last prompt row the token just sampled), then drafts for the
        sequences in `finishing` (indices into the batch whose prompts ended in this step)."""
        mtp_TD = self.model.mtp_forward(next_ids_T, main_states_TD, batch, self.cache)
        last_rows = (batch.query_starts_B + batch.query_lens_B - 1)[list(finishing)]
        positions = [batch.host_context_lens[b] + batch.host_query_lens[b] - 1 for b in finishing]
        return self.draft([batch.host_tables[b] for b in finishing], positions, mtp_TD[last_rows], params,
                          generators)

    # one decode step ------------------------------------------------------------------------------------------
    def step(self, tables: Sequence[Sequence[int]], lengths: Sequence[int], last_tokens: Sequence[int],
             drafts: Drafts, params: Sequence[SamplingParams],
             generators: Sequence[torch.Generator | None]) -> tuple[Verdict, Drafts]:
        """Steps 1-4 for sequences of `lengths` tokens whose last token and drafts wait. Returns what each
        sequence accepted and emits, and the next step's drafts. With no sequences it still runs every forward
        (empty), so an idle EP rank joins each all-to-all of its busy peers."""
        verdict, states_BD, positions = self.verify(tables, lengths, last_tokens, drafts, params, generators)
        return verdict, self.draft(tables, positions, states_BD, params, generators)

    def verify(self, tables: Sequence[Sequence[int]], lengths: Sequence[int], last_tokens: Sequence[int],
               drafts: Drafts, params: Sequence[SamplingParams],
               generators: Sequence[torch.Generator | None]) -> tuple[Verdict, torch.Tensor, list[int]]:
        """Steps 1-3: returns the verdict, and each sequence's MTP state and position to draft from."""
        k, batch_size = self.num_drafts, len(lengths)
        if not tables_cover(tables, lengths, k, self.cache.block_size):
            raise ValueError(f"block tables must cover position L + {2 * k - 2} of every sequence")
        batch = AttentionBatch.build(tables, [n - 1 for n in lengths], [k + 1] * batch_size, self.cache.block_size,
                                     self.device, verify=True)
        last_B = torch.tensor(list(last_tokens), dtype=torch.int64, device=self.device)
        ids_BK1 = torch.cat([last_B[:, None], drafts.tokens_BK.to(self.device)], dim=1)
        states_TD = self.forward(ids_BK1.flatten(), batch)
        logits_BK1V = self.model.logits(states_TD).view(batch_size, k + 1, self.model.cfg.vocab_size)
        finite_B = torch.isfinite(logits_BK1V).any(-1).all(-1)
        if not bool(finite_B.all()):  # a broken row must not decide (nor crash) the others' acceptance
            logits_BK1V = logits_BK1V.masked_fill(~finite_B[:, None, None], 0.0)
        verdict = self.accept(drafts, logits_BK1V, params, generators)
        verdict.failed = (~finite_B).tolist()
        # row i of a sequence takes the token at position L + i: accepted drafts, the target's token, padding
        next_ids = [(toks + [toks[-1]] * k)[: k + 1] for toks in verdict.tokens]
        next_T = torch.tensor(next_ids, dtype=torch.int64, device=self.device).view(-1)
        mtp_TD = self.model.mtp_forward(next_T, states_TD, batch, self.cache)
        rows = torch.tensor([b * (k + 1) + n for b, n in enumerate(verdict.accepted)], dtype=torch.int64,
                            device=self.device)
        positions = [n - 1 + a for n, a in zip(lengths, verdict.accepted, strict=True)]
        return verdict, mtp_TD[rows], positions

    @staticmethod
    def accept(drafts: Drafts, logits_BK1V: torch.Tensor, params: Sequence[SamplingParams],
               generators: Sequence[torch.Generator | None]) -> Verdict:
        """Greedy acceptance when every sequence is greedy, else speculative sampling (a greedy sequence's
        target is its argmax, one-hot)."""
        tokens_BK = drafts.tokens_BK.to(logits_BK1V.device)
        if all(p.greedy for p in params):
            return greedy_accept(tokens_BK, logits_BK1V)
        one_hot = torch.nn.functional.one_hot
        vocab = logits_BK1V.shape[-1]
        target_BK1V = torch.stack([torch.stack([one_hot(row.argmax(), vocab).float() if p.greedy else
                                                filter_logits(row, p).softmax(-1) for row in logits_BK1V[b]])
                                   for b, p in enumerate(params)])
        draft_BKV = drafts.probs_BKV if drafts.probs_BKV is not None else one_hot(tokens_BK, vocab).float()
        return rejection_sample(tokens_BK, draft_BKV, target_BK1V, list(generators))
