"""Fused MoE gate: scores, correction bias, group-limited top-k, normalisation and scaling in one kernel.

    ids_TK, weights_TK = fused_gate(logits_TE, bias_E, top_k=8, scoring="sigmoid", method="noaux_tc",
                                    n_group=8, topk_group=4, normalize=True, scaling=2.5)

One program per token holds the token's E scores in registers (E a power of two: 256 for V3, 64 for
V2-Lite). Selection is by repeated arg-max, which breaks ties toward the lower index exactly as the
reference's stable sort does. Reference: moe_pd.model.gate (gate_scores, select_experts, topk_weights).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_pd.kernels._common import check, check_tensor, is_pow2

SCORING = {"sigmoid": 0, "softmax": 1}
METHOD = {"greedy": 0, "noaux_tc": 1, "group_limited_greedy": 2}


@triton.jit
def _gate_kernel(logits_ptr, bias_ptr, ids_ptr, weights_ptr, stride_t, scaling,
                 E: tl.constexpr, G: tl.constexpr, TOPK_GROUP: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                 SCORING_: tl.constexpr, METHOD_: tl.constexpr, HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr):
    token = tl.program_id(0)
    experts = tl.arange(0, E)
    logits = tl.load(logits_ptr + token * stride_t + experts).to(tl.float32)
    if SCORING_ == 0:
        scores = tl.sigmoid(logits)
    else:
        shifted = tl.exp(logits - tl.max(logits, axis=0))
        scores = shifted / tl.sum(shifted, axis=0)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + experts).to(tl.float32)

    if METHOD_ != 0:  # keep only the experts of the TOPK_GROUP best groups
        grouped = tl.reshape(choice, (G, E // G))
        best = tl.max(grouped, axis=1)
        if METHOD_ == 1:  # a group scores the sum of its two best entries
            cols = tl.arange(0, E // G)
            first = tl.argmax(grouped, axis=1)
            without_first = tl.where(cols[None, :] == first[:, None], float("-inf"), grouped)
            group_score = best + tl.max(without_first, axis=1)
        else:
            group_score = best
        groups = tl.arange(0, G)
        keep = groups < 0
        for _ in tl.static_range(TOPK_GROUP):
            pick = tl.argmax(group_score, axis=0)
            keep = keep | (groups == pick)
            group_score = tl.where(groups == pick, float("-inf"), group_score)
        allowed = tl.reshape(tl.broadcast_to(keep[:, None], (G, E // G)), (E,))
        choice = tl.where(allowed, choice, float("-inf"))

    slots = tl.arange(0, K_PAD)
    ids = tl.zeros((K_PAD,), dtype=tl.int64)
    weights = tl.zeros((K_PAD,), dtype=tl.float32)
    for k in tl.static_range(K):
        pick = tl.argmax(choice, axis=0)
        ids = tl.where(slots == k, pick.to(tl.int64), ids)
        weights = tl.where(slots == k, tl.sum(tl.where(experts == pick, scores, 0.0), axis=0), weights)
        choice = tl.where(experts == pick, float("-inf"), choice)
    if NORMALIZE:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    weights = weights * scaling
    tl.store(ids_ptr + token * K + slots, ids, mask=slots < K)
    tl.store(weights_ptr + token * K + slots, weights, mask=slots < K)


def fused_gate(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, top_k: int, scoring: str, method: str,
               n_group: int = 1, topk_group: int = 1, normalize: bool = True,
               scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids [T, K] int64, best first; routing weights [T, K] fp32), as moe_pd.model.gate computes."""
    check_tensor("logits_TE", logits_TE, 2)
    tokens, experts = logits_TE.shape
    check(scoring in SCORING, f"scoring={scoring!r}: must be one of {sorted(SCORING)}")
    check(method in METHOD, f"method={method!r}: must be one of {sorted(METHOD)}")
    check(is_pow2(experts), f"the fused gate needs a power-of-two expert count, got {experts}")
    if method != "greedy":
        check(experts % n_group == 0 and is_pow2(n_group), f"n_group={n_group} must be a power of two dividing "
                                                            f"{experts}")
        check(1 <= topk_group <= n_group, f"topk_group={topk_group} must be in [1, n_group={n_group}]")
        check(top_k <= topk_group * experts // n_group, f"top_k={top_k} exceeds the experts of {topk_group} groups")
    check(1 <= top_k <= experts, f"top_k={top_k} must be in [1, {experts}]")
    if bias_E is not None:
        check(bias_E.shape == (experts,), f"bias_E: expected shape ({experts},), got {tuple(bias_E.shape)}")
    logits_TE = logits_TE if logits_TE.stride(1) == 1 else logits_TE.contiguous()
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=logits_TE.device)
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=logits_TE.device)
    if tokens:
        _gate_kernel[(tokens,)](logits_TE, bias_E if bias_E is not None else logits_TE, ids, weights,
                                logits_TE.stride(0), float(scaling), experts, n_group if method != "greedy" else 1,
                                topk_group, top_k, triton.next_power_of_2(top_k), SCORING[scoring], METHOD[method],
                                bias_E is not None, normalize)
    return ids, weights
