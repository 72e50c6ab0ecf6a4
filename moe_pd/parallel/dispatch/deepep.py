"""Adapter to DeepEP's V1 `deep_ep.Buffer` (github.com/deepseek-ai/DeepEP, `deep_ep/buffers/legacy.py`): normal
kernels for prefill-sized steps, low-latency kernels with receive hooks for decode-sized steps.

Legend: T tokens on this rank, D hidden, K top-k, E local expert slots, R ranks, P physical slots,
N rows received (normal mode), C = R * max dispatch tokens per rank (low-latency capacity).

DeepEP semantics handled here:
- normal dispatch delivers each token once per rank with its top-k ids as *local* ids (-1 elsewhere) and
  weights; its combine adds rows *without* weights, so each rank applies the routing weights to its own
  experts' outputs before combining (permute.reduce);
- low-latency dispatch delivers a masked layout [E, C, D] with `recv_count[e]` valid rows per expert,
  cast to FP8 inside the kernel when asked; its combine takes the same layout and applies the weights;
- with `return_recv_hook=True` only the send phase runs at `*_start`; the hook, called at `*_wait`,
  receives, so compute placed in between overlaps with the transfer without occupying SMs.
DeepEP's own constraints apply (2+ GPUs, rank counts in its config tables); on one GPU use the
all_to_all or nvshmem backends. `deep_ep` is imported only when this backend is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moe_pd.fp8 import dequantize_act_1x128, quantize_act_1x128
from moe_pd.parallel.dispatch import permute
from moe_pd.parallel.dispatch.base import Dispatcher, DispatchResult
from moe_pd.parallel.placement import ExpertPlacement
from moe_pd.parallel.state import ParallelState

MODES = ("normal", "low_latency", "auto")


def masked_to_grouped(recv_ECD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """The first counts[e] rows of each expert, expert-major: [sum(counts), D]."""
    valid_EC = torch.arange(recv_ECD.shape[1], device=recv_ECD.device)[None, :] < counts_E[:, None]
    return recv_ECD[valid_EC]


def grouped_to_masked(y_MD: torch.Tensor, counts_E: torch.Tensor, capacity: int) -> torch.Tensor:
    out_ECD = y_MD.new_zeros(counts_E.shape[0], capacity, y_MD.shape[1])
    valid_EC = torch.arange(capacity, device=y_MD.device)[None, :] < counts_E[:, None]
    out_ECD[valid_EC] = y_MD
    return out_ECD


@dataclass
class _NormalHandle:
    deepep_handle: Any
    expansion: permute.Expansion


@dataclass
class _LowLatencyHandle:
    deepep_handle: Any
    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    counts_E: torch.Tensor
    capacity: int


class DeepEPDispatcher(Dispatcher):
    def __init__(self, state: ParallelState, hidden_size: int, placement: ExpertPlacement,
                 normal_buffer: Any = None, low_latency_buffer: Any = None, mode: str = "auto",
                 max_dispatch_tokens_per_rank: int = 128, fp8: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: must be one of {MODES}")
        if mode != "low_latency" and normal_buffer is None:
            raise ValueError(f"mode={mode!r} needs a normal-mode Buffer")
        if mode != "normal" and low_latency_buffer is None:
            raise ValueError(f"mode={mode!r} needs a low-latency Buffer")
        self.state, self.hidden, self.placement, self.fp8 = state, hidden_size, placement, fp8
        self.routing_salt = state.rank
        self.normal, self.low_latency, self.mode = normal_buffer, low_latency_buffer, mode
        self.max_tokens = max_dispatch_tokens_per_rank
        self.num_local_experts = state.experts_per_rank
        self._use_low_latency = mode == "low_latency"

    def begin_step(self, max_tokens_any_rank: int) -> None:
        if self.mode == "auto":
            self._use_low_latency = max_tokens_any_rank <= self.max_tokens

    def dispatch_start(self, x_TD, topk_ids_TK, topk_weights_TK, layer: int = -1):
        phys_TK = self.to_physical(topk_ids_TK, layer).contiguous()
        if self._use_low_latency:
            return self._ll_dispatch_start(x_TD, phys_TK, topk_weights_TK)
        return self._normal_dispatch_start(x_TD, phys_TK, topk_weights_TK)

    def dispatch_wait(self, pending) -> DispatchResult:
        kind = pending[0]
        return self._ll_dispatch_wait(pending) if kind == "ll" else self._normal_dispatch_wait(pending)

    def combine_start(self, y_MD, handle):
        if isinstance(handle, _LowLatencyHandle):
            y_ECD = grouped_to_masked(y_MD, handle.counts_E, handle.capacity)
            combined, event, hook = self.low_latency.low_latency_combine(
                y_ECD, handle.topk_ids_TK, handle.topk_weights_TK.float().contiguous(), handle.deepep_handle,
                return_recv_hook=True)
            return combined, hook
        partial_ND = permute.reduce(y_MD, handle.expansion)  # DeepEP's normal combine does not weight
        combined, _, event = self.normal.combine(partial_ND, handle.deepep_handle, async_finish=True)
        return combined, event

    def combine_wait(self, pending) -> torch.Tensor:
        combined, waiter = pending
        if callable(waiter):
            waiter()  # the low-latency receive hook
        else:
            waiter.current_stream_wait()
        return combined

    # normal kernels ---------------------------------------------------------------------------------------
    def _normal_dispatch_start(self, x_TD, phys_TK, weights_TK):
        per_rank, per_rdma_rank, per_expert, in_rank, _ = self.normal.get_dispatch_layout(
            phys_TK, self.placement.num_slots)
        x_in = x_TD
        if self.fp8:  # normal kernels take an already-cast (e4m3, 1x128 scales) pair
            x_in = quantize_act_1x128(x_TD) if x_TD.shape[0] else (
                x_TD.to(torch.float8_e4m3fn), x_TD.new_zeros(0, x_TD.shape[1] // 128))
        recv_x, recv_ids, recv_weights, _, handle, event = self.normal.dispatch(
            x_in, topk_idx=phys_TK, topk_weights=weights_TK.float(), num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            async_finish=True)
        return "normal", recv_x, recv_ids, recv_weights, handle, event, x_TD.dtype

    def _normal_dispatch_wait(self, pending) -> DispatchResult:
        _, recv_x, recv_ids, recv_weights, handle, event, dtype = pending
        event.current_stream_wait()
        if isinstance(recv_x, tuple):
            recv_x = dequantize_act_1x128(recv_x[0], recv_x[1], dtype)
        x_MD, expansion = permute.expand(recv_x, recv_ids.long(), recv_weights, self.num_local_experts)
        return DispatchResult(x_MD, expansion.counts_E, _NormalHandle(handle, expansion))

    # low-latency kernels ----------------------------------------------------------------------------------
    def _ll_dispatch_start(self, x_TD, phys_TK, weights_TK):
        if x_TD.shape[0] > self.max_tokens:
            raise RuntimeError(f"{x_TD.shape[0]} tokens exceed the low-latency capacity of "
                               f"{self.max_tokens} per rank (parallel.deepep_max_dispatch_tokens_per_rank)")
        recv, counts_E, handle, _, hook = self.low_latency.low_latency_dispatch(
            x_TD.contiguous(), phys_TK, self.max_tokens, self.placement.num_slots, use_fp8=self.fp8,
            return_recv_hook=True)
        return "ll", recv, counts_E, handle, hook, phys_TK, weights_TK, x_TD.dtype

    def _ll_dispatch_wait(self, pending) -> DispatchResult:
        _, recv, counts_E, handle, hook, phys_TK, weights_TK, dtype = pending
        hook()
        recv_ECD = dequantize_act_1x128(recv[0], recv[1], dtype) if isinstance(recv, tuple) else recv
        counts_E = counts_E.long()
        x_MD = masked_to_grouped(recv_ECD, counts_E)
        return DispatchResult(x_MD, counts_E, _LowLatencyHandle(handle, phys_TK, weights_TK, counts_E,
                                                                recv_ECD.shape[1]))


def make_deepep_dispatcher(state: ParallelState, hidden_size: int, placement: ExpertPlacement, mode: str,
                           max_dispatch_tokens_per_rank: int, fp8: bool) -> DeepEPDispatcher:
    """Allocates DeepEP buffers the way its README does; needs `deep_ep` built from source (docs/deepep.md)."""
    try:
        from deep_ep import Buffer
    except ImportError as exc:
        from moe_pd.config.errors import ConfigError

        raise ConfigError("parallel.dispatcher='deepep' needs DeepEP built from source (see docs/deepep.md); "
                          f"importing deep_ep failed: {exc}") from None
    group, ranks = state.group, state.ep_size
    hidden_bytes = hidden_size * 2  # bf16 activations
    normal = low_latency = None
    if mode != "low_latency":
        nvl = rdma = 0
        for config in (Buffer.get_dispatch_config(ranks), Buffer.get_combine_config(ranks)):
            nvl = max(config.get_nvl_buffer_size_hint(hidden_bytes, ranks), nvl)
            rdma = max(config.get_rdma_buffer_size_hint(hidden_bytes, ranks), rdma)
        normal = Buffer(group, nvl, rdma)
    if mode != "normal":
        rdma = Buffer.get_low_latency_rdma_size_hint(max_dispatch_tokens_per_rank, hidden_size, ranks,
                                                     placement.num_slots)
        low_latency = Buffer(group, 0, rdma, low_latency_mode=True,
                             num_qps_per_rank=placement.num_slots // ranks)
    return DeepEPDispatcher(state, hidden_size, placement, normal, low_latency, mode,
                            max_dispatch_tokens_per_rank, fp8)
