"""Rank-side permutation shared by the EP backends. Legend: N received token rows, K top-k, E local
expert slots, M (row, k) pairs routed to this rank.

A rank receives each token once (whatever number of its experts the token chose) together with the
token's top-k *local* slot ids (-1 where the expert lives elsewhere) and weights, as DeepEP's normal
dispatch delivers them. `expand` lays the rows out expert-major for the grouped GEMM; `reduce` turns
expert outputs back into one weighted partial sum per received row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_pd.parallel.dispatch.base import weighted_scatter_sum
from moe_pd.parallel.dispatch.local import group_by_expert


@dataclass
class Expansion:
    pair_M: torch.Tensor
    """Flat (row * K + k) position of each expert-major pair."""
    counts_E: torch.Tensor
    weights_NK: torch.Tensor


def expand(x_ND: torch.Tensor, local_ids_NK: torch.Tensor, weights_NK: torch.Tensor,
           num_local: int) -> tuple[torch.Tensor, Expansion]:
    """Received rows -> (x_MD grouped by local expert slot, bookkeeping for `reduce`)."""
    order, counts_E, num_valid = group_by_expert(local_ids_NK, num_local)
    pair_M = order[:num_valid]
    return x_ND[pair_M // max(local_ids_NK.shape[1], 1)], Expansion(pair_M, counts_E, weights_NK)


def reduce(y_MD: torch.Tensor, expansion: Expansion) -> torch.Tensor:
    """Expert outputs -> one weighted partial sum per received row: [N, D]."""
    return weighted_scatter_sum(y_MD, expansion.pair_M, expansion.weights_NK)


def token_rank_layout(phys_ids_TK: torch.Tensor, slots_per_rank: int, num_ranks: int):
    """Which ranks each token must visit and, per (token, rank), the token's local slot ids there.

    Returns (send_token_S, send_rank_S, local_ids_SK): S (token, rank) pairs ordered rank-major then by
    token, and for each the K local slot ids on that rank (-1 for experts elsewhere or unselected).
    """
    valid = phys_ids_TK >= 0
    dest_TK = torch.where(valid, phys_ids_TK // slots_per_rank, -1)
    in_rank_TR = torch.zeros(phys_ids_TK.shape[0], num_ranks, dtype=torch.bool, device=phys_ids_TK.device)
    rows, cols = valid.nonzero(as_tuple=True)
    in_rank_TR[rows, dest_TK[rows, cols]] = True
    send_rank_S, send_token_S = in_rank_TR.t().nonzero(as_tuple=True)
    dest_SK = dest_TK[send_token_S]
    local_ids_SK = torch.where(dest_SK == send_rank_S[:, None], phys_ids_TK[send_token_S] % slots_per_rank, -1)
    return send_token_S, send_rank_S, local_ids_SK


def row_metadata(local_ids_SK: torch.Tensor, weights_SK: torch.Tensor) -> torch.Tensor:
    """What travels with each token row: its K local slot ids then its K weights, as fp32 [S, 2K] (slot
    ids are small exact integers)."""
    return torch.cat([local_ids_SK.float(), weights_SK.float()], dim=1)


def split_row_metadata(meta_N2K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of row_metadata: (local slot ids int64 [N, K], weights [N, K])."""
    top_k = meta_N2K.shape[1] // 2
    return meta_N2K[:, :top_k].long(), meta_N2K[:, top_k:]
