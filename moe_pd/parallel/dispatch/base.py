"""The token-dispatcher contract between MoE layers and expert parallelism.

Legend: T tokens on this rank, D hidden, K top-k, N rows received for local experts, E local experts.

dispatch(x_TD, topk_ids_TK, topk_weights_TK) -> DispatchResult(x_ND grouped by local expert in slot
order, counts_E, handle); combine(y_ND, handle) -> y_TD, the routing-weighted sum of each token's expert
outputs, in the original token order on the original rank. A topk id of -1 routes nowhere. Each call is
split into a start half and a wait half so the overlap scheduler can put compute between them; the plain
`dispatch`/`combine` run both halves back to back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DispatchResult:
    x_ND: torch.Tensor
    """Rows for this rank's experts, expert slot 0's rows first."""
    counts_E: torch.Tensor
    """int64 row count per local expert slot; sums to N."""
    handle: Any
    """Opaque state that `combine` needs to route results back."""


def weighted_scatter_sum(y_ND: torch.Tensor, slot_N: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """y_TD[t] = sum over rows n answering token t of w[t, k_n] * y[n].

    slot_N[n] is the flat (token * K + k) position row n answers. Rows are added in row order
    (expert-major), which is deterministic on CPU; memory is T x D, never T x K x D.
    """
    num_tokens, top_k = topk_weights_TK.shape
    weights_N = topk_weights_TK.reshape(-1)[slot_N].to(y_ND.dtype)
    out_TD = y_ND.new_zeros(num_tokens, y_ND.shape[-1])
    return out_TD.index_add_(0, slot_N // max(top_k, 1), y_ND * weights_N[:, None])


class Dispatcher(ABC):
    """Moves tokens to the ranks that hold their experts and the results back."""

    num_local_experts: int
    placement: Any = None
    """ExpertPlacement mapping logical ids to physical slots (None: ids are slots)."""
    load_recorder: Any = None
    """ExpertLoadRecorder fed with every layer's logical ids (EPLB)."""
    dynamic_routing: bool = False
    """Spread each expert's tokens evenly over its replicas within a batch (else a fixed choice)."""
    routing_salt: int = 0
    replica_router: Any = None
    """eplb.routing='balanced': eplb.replica_routing.ReplicaRouter, which splits each step's tokens of a
    replicated expert over its replicas to level the GPUs (one all_reduce of the gate's counts per layer)."""

    def to_physical(self, topk_ids_TK: torch.Tensor, layer: int) -> torch.Tensor:
        """Records the logical load, then maps logical ids to physical slots (before counts are exchanged)."""
        if self.load_recorder is not None and layer >= 0:
            self.load_recorder.record(layer, topk_ids_TK)
        if self.placement is None:
            return topk_ids_TK
        if self.placement.log2phy_LEX.device != topk_ids_TK.device:  # maps are planned on the host
            self.placement = self.placement.to(topk_ids_TK.device)
        if self.replica_router is not None and layer >= 0:
            return self.replica_router.route(topk_ids_TK, self.placement, layer)
        return self.placement.route(topk_ids_TK, layer, self.dynamic_routing, self.routing_salt)

    def record_received(self, layer: int, rows: int) -> None:
        if self.load_recorder is not None and layer >= 0:
            self.load_recorder.record_received(layer, rows)

    @abstractmethod
    def dispatch_start(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                       layer: int = -1) -> Any:
        """Starts sending; returns a pending object for `dispatch_wait`. `topk_ids_TK` are logical expert
        ids; `layer` (the model layer index) selects that layer's expert placement and labels the call."""

    @abstractmethod
    def dispatch_wait(self, pending: Any) -> DispatchResult:
        """Blocks until this rank's rows have arrived."""

    @abstractmethod
    def combine_start(self, y_ND: torch.Tensor, handle: Any) -> Any:
        """Starts sending expert outputs back; returns a pending object for `combine_wait`."""

    @abstractmethod
    def combine_wait(self, pending: Any) -> torch.Tensor:
        """Blocks until every token's weighted sum is back: y_TD."""

    def begin_step(self, max_tokens_any_rank: int) -> None:
        """Called on every rank before each forward with the largest token count of any rank this step."""

    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                 layer: int = -1) -> DispatchResult:
        return self.dispatch_wait(self.dispatch_start(x_TD, topk_ids_TK, topk_weights_TK, layer))

    def combine(self, y_ND: torch.Tensor, handle: Any) -> torch.Tensor:
        return self.combine_wait(self.combine_start(y_ND, handle))
