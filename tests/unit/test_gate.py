"""Routing math by hand: group limits, the correction bias, ties, normalisation."""

import pytest
import torch

from moe_pd.model.gate import gate_scores, group_mask, select_experts, topk_weights

# 8 experts in 4 groups of 2. Group sums of top-2: g0 1.0, g1 0.5, g2 1.5, g3 0.65.
SCORES = torch.tensor([[0.9, 0.1, 0.2, 0.3, 0.8, 0.7, 0.05, 0.6]])


def test_group_limited_topk_by_hand():
    ids = select_experts(SCORES, top_k=3, method="noaux_tc", n_group=4, topk_group=2)
    # Groups 2 and 0 survive, so expert 7 (group 3) is out: the best three of experts 0, 1, 4, 5.
    assert ids.tolist() == [[0, 4, 5]]


def test_masked_group_never_selected_even_if_its_expert_is_better():
    scores = torch.tensor([[0.5, 0.5, 0.1, 0.1, 0.1, 0.1, 0.0, 0.99]])
    # g0 = 1.0, g1 = 0.2, g2 = 0.2, g3 = 0.99: keep g0 and g3; with one group only g0 (1.0 > 0.99).
    ids = select_experts(scores, top_k=2, method="noaux_tc", n_group=4, topk_group=1)
    assert ids.tolist() == [[0, 1]]


def test_correction_bias_steers_selection_not_weights():
    bias = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0.5])
    ids = select_experts(SCORES, top_k=2, method="noaux_tc", n_group=4, topk_group=2, correction_bias_E=bias)
    # g3 becomes 0.05 + 1.1 = 1.15 and joins g2; expert 7 (biased 1.1) then 4 (0.8).
    assert ids.tolist() == [[7, 4]]
    w = topk_weights(SCORES, ids, normalize=True, scaling=2.5)
    torch.testing.assert_close(w, torch.tensor([[0.6 / 1.4 * 2.5, 0.8 / 1.4 * 2.5]]))


def test_ties_go_to_the_lower_index():
    scores = torch.full((1, 8), 0.5)
    assert select_experts(scores, top_k=3, method="noaux_tc", n_group=4, topk_group=2).tolist() == [[0, 1, 2]]
    assert select_experts(scores, top_k=3, method="greedy").tolist() == [[0, 1, 2]]
    mask = group_mask(scores, 4, 2, "top2_sum")
    assert mask.tolist() == [[True] * 4 + [False] * 4]


def test_group_limited_greedy_scores_groups_by_max():
    # Max per group: g0 0.9, g1 0.3, g2 0.8, g3 0.6 -> g0, g2 (sum of top-2 would be the same here),
    # but make the sums disagree: g3 = (0.6, 0.59) sums to 1.19 > g0's 1.0.
    scores = torch.tensor([[0.9, 0.1, 0.2, 0.3, 0.8, 0.7, 0.59, 0.6]])
    assert select_experts(scores, 2, "group_limited_greedy", 4, 2).tolist() == [[0, 4]]
    assert select_experts(scores, 2, "noaux_tc", 4, 2).tolist() == [[4, 5]]


def test_greedy_ignores_groups():
    assert select_experts(SCORES, top_k=3, method="greedy").tolist() == [[0, 4, 5]]
    assert select_experts(SCORES, top_k=4, method="greedy").tolist() == [[0, 4, 5, 7]]


def test_weights_unnormalised_are_scaled_scores():
    ids = torch.tensor([[0, 4]])
    torch.testing.assert_close(topk_weights(SCORES, ids, normalize=False, scaling=2.0), torch.tensor([[1.8, 1.6]]))


def test_scores():
    logits = torch.tensor([[0.0, 1.0, -1.0]])
    torch.testing.assert_close(gate_scores(logits, "sigmoid"), torch.sigmoid(logits))
    torch.testing.assert_close(gate_scores(logits, "softmax").sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="scoring_func"):
        gate_scores(logits, "relu")


@pytest.mark.parametrize("method", ["noaux_tc", "greedy", "group_limited_greedy"])
def test_ids_always_valid_and_distinct(method):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 16, generator=gen) * 20
    logits[::3] = -1e30  # saturated scores: everything ties at 0
    scores = gate_scores(logits, "sigmoid")
    ids = select_experts(scores, 4, method, n_group=4, topk_group=2)
    assert ids.min() >= 0 and ids.max() < 16  # never -1, never out of range
    assert all(len(set(row)) == 4 for row in ids.tolist())
    if method != "greedy":
        groups = ids // 4
        assert all(len(set(row)) <= 2 for row in groups.tolist())
