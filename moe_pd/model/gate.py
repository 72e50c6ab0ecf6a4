"""MoE routing math as pure functions. Legend: T tokens, E routed experts, G groups, K top-k.

Ties are broken toward the lower index everywhere (stable sorts), so the choice is defined and any
kernel can reproduce it. The correction bias steers selection only; weights use unbiased scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_pd.config.model import ModelConfig


def gate_scores(logits_TE: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """Per-expert affinity in fp32: sigmoid (V3) or softmax over experts (V2)."""
    logits_TE = logits_TE.float()
    if scoring_func == "sigmoid":
        return logits_TE.sigmoid()
    if scoring_func == "softmax":
        return logits_TE.softmax(dim=-1)
    raise ValueError(f"scoring_func={scoring_func!r}: must be 'sigmoid' or 'softmax'")


def _stable_topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def group_mask(choice_TE: torch.Tensor, n_group: int, topk_group: int, group_score: str) -> torch.Tensor:
    """Bool [T, E]: experts inside the `topk_group` best groups. A group scores the sum of its top-2
    entries ('top2_sum', V3) or its best entry ('max', V2 group_limited_greedy)."""
    num_tokens, num_experts = choice_TE.shape
    grouped_TGX = choice_TE.view(num_tokens, n_group, num_experts // n_group)
    if group_score == "top2_sum":
        score_TG = grouped_TGX.topk(2, dim=-1).values.sum(dim=-1)
    elif group_score == "max":
        score_TG = grouped_TGX.max(dim=-1).values
    else:
        raise ValueError(f"group_score={group_score!r}: must be 'top2_sum' or 'max'")
    keep_TG = torch.zeros_like(score_TG, dtype=torch.bool)
    keep_TG.scatter_(1, _stable_topk_indices(score_TG, topk_group), True)
    return keep_TG[:, :, None].expand_as(grouped_TGX).reshape(num_tokens, num_experts)


def select_experts(
    scores_TE: torch.Tensor,
    top_k: int,
    method: str,
    n_group: int = 1,
    topk_group: int = 1,
    correction_bias_E: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-k expert ids [T, K] (int64), best first; never an expert of a masked group."""
    choice_TE = scores_TE if correction_bias_E is None else scores_TE + correction_bias_E.float()
    if method == "noaux_tc":
        allowed_TE = group_mask(choice_TE, n_group, topk_group, "top2_sum")
    elif method == "group_limited_greedy":
        allowed_TE = group_mask(choice_TE, n_group, topk_group, "max")
    elif method == "greedy":
        allowed_TE = None
    else:
        raise ValueError(f"method={method!r}: must be 'noaux_tc', 'greedy' or 'group_limited_greedy'")
    if allowed_TE is not None:
        choice_TE = choice_TE.masked_fill(~allowed_TE, float("-inf"))
    return _stable_topk_indices(choice_TE, top_k)


def topk_weights(
    scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor, normalize: bool, scaling: float
) -> torch.Tensor:
    """Routing weights [T, K] from the unbiased scores, renormalised if asked, times `scaling`."""
    weights_TK = scores_TE.gather(1, topk_ids_TK)
    if normalize:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return weights_TK * scaling


def route(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate logits -> (expert ids [T, K], routing weights [T, K]) by the model's routing method."""
    scores_TE = gate_scores(logits_TE, cfg.scoring_func)
    ids_TK = select_experts(scores_TE, cfg.num_experts_per_tok, cfg.topk_method, cfg.n_group, cfg.topk_group, bias_E)
    return ids_TK, topk_weights(scores_TE, ids_TK, cfg.norm_topk_prob, cfg.routed_scaling_factor)


class Gate(nn.Module):
    """Router of one MoE layer: fp32 logits, then the pure functions above."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        if cfg.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    ops = None
    """moe_pd.model.ops implementation (set by DeepseekForCausalLM.use_ops); None: `route`."""

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        if self.ops is not None:
            return self.ops.gate(logits_TE, self.e_score_correction_bias, self.cfg)
        return route(logits_TE, self.e_score_correction_bias, self.cfg)
