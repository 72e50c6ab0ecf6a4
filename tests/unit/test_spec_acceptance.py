"""Acceptance of drafted tokens: greedy keeps the target's argmax path; speculative sampling keeps the
target's distribution (a chi-square test on a small vocabulary); rejected positions' pages roll back."""

import math

import pytest
import torch

from moe_pd.engine.spec.acceptance import greedy_accept, rejection_sample
from moe_pd.kvcache.block_manager import BlockManager


def one_hot_logits(best: list[list[int]], vocab: int = 6) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(best), vocab).float() * 5


def test_greedy_accepts_the_leading_matches_then_the_targets_token():
    drafts = torch.tensor([[3, 4, 5], [3, 4, 5], [1, 1, 1], [2, 0, 2]])
    target = one_hot_logits([[3, 4, 5, 0], [3, 2, 5, 1], [0, 1, 1, 1], [2, 0, 2, 4]])
    verdict = greedy_accept(drafts, target)
    assert verdict.accepted == [3, 1, 0, 3]
    assert verdict.tokens == [[3, 4, 5, 0], [3, 2], [0], [2, 0, 2, 4]]


# A two-step target over 4 tokens: p1 for the first token, p2[x] for the second given the first is x.
P1 = torch.tensor([0.1, 0.2, 0.3, 0.4])
P2 = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.05, 0.05, 0.1, 0.8], [0.4, 0.4, 0.1, 0.1]])
# A draft that disagrees: q1 for the first draft, q2[x] for the second given the first draft x.
Q1 = torch.tensor([0.5, 0.3, 0.1, 0.1])
Q2 = torch.tensor([[0.1, 0.1, 0.1, 0.7], [0.6, 0.2, 0.1, 0.1], [0.3, 0.3, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]])


def chi_square_p_value(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Upper tail of the chi-square statistic (Wilson-Hilferty normal approximation)."""
    n = observed.sum()
    expected = expected_probs * n
    stat = float(((observed - expected) ** 2 / expected).sum())
    dof = observed.numel() - 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def sample_pairs(trials: int, draft_greedy: bool, seed: int) -> torch.Tensor:
    """Counts [4, 4] of the first two emitted tokens over `trials` runs of one verification step with K = 2."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(4, 4)
    batch = 2000
    for start in range(0, trials, batch):
        d1 = Q1.argmax().expand(batch) if draft_greedy else torch.multinomial(Q1, batch, True, generator=gen)
        q2 = Q2[d1]
        d2 = q2.argmax(-1) if draft_greedy else torch.multinomial(q2, 1, generator=gen)[:, 0]
        q_BKV = torch.stack([Q1.expand(batch, -1), q2], dim=1)
        if draft_greedy:
            q_BKV = torch.nn.functional.one_hot(torch.stack([d1, d2], 1), 4).float()
        # target rows: after the last token, after d1, after d2 (the bonus row: any distribution works)
        p_BK1V = torch.stack([P1.expand(batch, -1), P2[d1], P1.expand(batch, -1)], dim=1)
        verdict = rejection_sample(torch.stack([d1, d2], 1), q_BKV, p_BK1V, [gen] * batch)
        for tokens in verdict.tokens:
            if len(tokens) >= 2:
                counts[tokens[0], tokens[1]] += 1
            else:  # the first token was a correction: its successor comes from the next step's target p2
                counts[tokens[0], int(torch.multinomial(P2[tokens[0]], 1, generator=gen))] += 1
    return counts


@pytest.mark.parametrize("draft_greedy", [False, True])
def test_rejection_sampling_keeps_the_target_distribution(draft_greedy):
    """Over 40000 steps the (first, second) emitted pair is distributed as p1(x) p2(y | x), drafts drawn from a
    different q (or greedy one-hot drafts); a draft sampler that ignored the rejection would fail."""
    counts = sample_pairs(40_000, draft_greedy, seed=1)
    joint = (P1[:, None] * P2).flatten()
    assert chi_square_p_value(counts.flatten(), joint) > 1e-3
    wrong = (Q1[:, None] * Q2).flatten()  # the draft's own joint: must be rejected by the same test
    assert chi_square_p_value(counts.flatten(), wrong) < 1e-6


def test_truncate_rolls_back_the_rejected_pages():
    bm = BlockManager(num_blocks=8, block_size=4)
    table, _ = bm.admit(list(range(6)), need_tokens=6)
    bm.grow(table, 6 + 7)  # a step with room for drafts: 13 tokens -> 4 pages
    assert len(table) == 4 and bm.num_free == 4
    assert bm.truncate(table, 9) == 1 and len(table) == 3 and bm.num_free == 5  # 9 tokens kept -> 3 pages
    assert bm.truncate(table, 9) == 0
    bm.commit(table, list(range(9)), 8)  # the two full pages enter the prefix cache
    assert bm.truncate(table, 4) == 2 and bm.num_free == 7 and table == table[:1]
    assert bm.match_prefix(list(range(8))) != []  # cached pages stay reusable after the rollback
