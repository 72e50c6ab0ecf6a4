"""Adapter to DeepEP's V2 `deep_ep.ElasticBuffer` (deep_ep/buffers/elastic.py: NCCL's GIN backend,
PyTorch >= 2.10, NCCL >= 2.30.4).

Legend: T tokens on this rank, D hidden, K top-k, E local expert slots, N delivered rows, C = R * decode
token cap (rows one expert can receive in a decode step).

V2 has one `dispatch` for every step size and no receive hook. Both uses go through it in expand mode
(`do_expand=True`: one row per (token, local expert), grouped by expert, DeepEP's "new GEMM layout"), so
rows arrive already grouped for the grouped GEMM and no permutation runs here:
- throughput (prefill-sized steps): `do_cpu_sync=True`, the host learns the exact counts and the rows
  are exactly the grouped rows: x_ND as delivered, counts from the handle;
- low latency (decode-sized steps): `do_cpu_sync=False`, nothing waits on the host and every shape is
  static (sized for `decode_max_tokens` per rank, a much smaller buffer than prefill's); the counts exist
  only on the device, so the rows are handed on in the masked layout [E, C, D] with a count per expert
  (as V1's low-latency kernels deliver it, and as the CUDA-graph path consumes it).
DeepEP's combine adds rows without weights, so each row is scaled by its own routing weight (the 1-D
expand-mode recv_topk_weights) before `combine`. The start halves issue the kernels on DeepEP's
communication stream (`async_with_compute_stream=True`); the wait halves make the compute stream wait for
their event: overlap comes from streams, not from a receive hook (docs/overlap.md).

A cached handle (`dispatch(handle=...)`) replays a previous dispatch's routing (topk_idx must be None), so
it only applies when the same tokens go to the same experts again; every decode layer routes anew, so
decode skips the CPU sync with `do_cpu_sync=False` instead (docs/deepep.md). `deep_ep` is imported only
when this backend is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moe_pd.fp8 import dequantize_act_1x128, quantize_act_1x128
from moe_pd.parallel.dispatch.base import Dispatcher, DispatchResult
from moe_pd.parallel.placement import ExpertPlacement
from moe_pd.parallel.state import ParallelState

MODES = ("normal", "low_latency", "auto")


@dataclass
class _Masked:
    """Where the masked layout's [E, C] entries sit among the delivered rows."""

    row_EC: torch.Tensor
    valid_EC: torch.Tensor
    num_rows: int


@dataclass
class ElasticHandle:
    ep_handle: Any
    """deep_ep.EPHandle: what `combine` needs to route rows back."""
    weights_N: torch.Tensor
    """Routing weight of each delivered row (expand mode: one per row)."""
    masked: _Masked | None
    """Set when the rows went on in the masked layout (no CPU sync)."""


def _wire(x_TD: torch.Tensor, fp8: bool):
    """What dispatch sends: the activations, or (e4m3, fp32 1x128 scales) when FP8 dispatch is on."""
    if not fp8:
        return x_TD.contiguous()
    if x_TD.shape[0] == 0:
        return x_TD.to(torch.float8_e4m3fn), x_TD.new_zeros(0, x_TD.shape[1] // 128, dtype=torch.float32)
    return quantize_act_1x128(x_TD)


class ElasticDeepEPDispatcher(Dispatcher):
    def __init__(self, state: ParallelState, hidden_size: int, placement: ExpertPlacement, buffer: Any,
                 mode: str = "auto", max_tokens_per_rank: int = 4096, decode_max_tokens: int = 128,
                 fp8: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: must be one of {MODES}")
        if decode_max_tokens > max_tokens_per_rank:
            raise ValueError(f"decode_max_tokens={decode_max_tokens} exceeds max_tokens_per_rank={max_tokens_per_rank}")
        self.state, self.hidden, self.placement, self.buffer, self.fp8 = state, hidden_size, placement, buffer, fp8
        self.mode, self.max_tokens, self.decode_max_tokens = mode, max_tokens_per_rank, decode_max_tokens
        self.routing_salt = state.rank
        self.num_local_experts = state.experts_per_rank
        self._sync = mode != "low_latency"

    def begin_step(self, max_tokens_any_rank: int) -> None:
        if self.mode == "auto":  # every rank sees the same maximum, so every rank picks the same shapes
            self._sync = max_tokens_any_rank > self.decode_max_tokens

    def dispatch_start(self, x_TD, topk_ids_TK, topk_weights_TK, layer: int = -1):
        phys_TK = self.to_physical(topk_ids_TK, layer).contiguous()
        cap = self.max_tokens if self._sync else self.decode_max_tokens
        if x_TD.shape[0] > cap:
            which = "deepep_max_tokens_per_rank" if self._sync else "deepep_max_dispatch_tokens_per_rank"
            raise RuntimeError(f"{x_TD.shape[0]} tokens exceed the DeepEP V2 buffer's {cap} per rank "
                               f"(parallel.{which})")
        recv_x, _, recv_w, handle, event = self.buffer.dispatch(
            _wire(x_TD, self.fp8), topk_idx=phys_TK, topk_weights=topk_weights_TK.float().contiguous(),
            num_experts=self.placement.num_slots, num_max_tokens_per_rank=cap, expert_alignment=1,
            async_with_compute_stream=True, do_cpu_sync=self._sync, do_expand=True)
        return recv_x, recv_w, handle, event, x_TD.dtype

    def dispatch_wait(self, pending) -> DispatchResult:
        recv_x, recv_w, handle, event, dtype = pending
        event.current_stream_wait()
        x_ND = dequantize_act_1x128(recv_x[0], recv_x[1], dtype) if isinstance(recv_x, tuple) else recv_x
        counts_E = handle.num_unaligned_recv_tokens_per_expert.long()
        if self._sync:  # exactly the grouped rows, expert by expert
            return DispatchResult(x_ND, counts_E, ElasticHandle(handle, recv_w, None))
        # No CPU sync: expert e's rows start at psum[e] - count[e]; lay them out [E, C, D] on the device.
        capacity = self.state.world_size * self.decode_max_tokens
        offset_C = torch.arange(capacity, device=x_ND.device)
        start_E = handle.psum_num_recv_tokens_per_expert.long() - counts_E
        valid_EC = offset_C[None, :] < counts_E[:, None]
        row_EC = torch.where(valid_EC, start_E[:, None] + offset_C[None, :], 0)
        x_ECD = torch.where(valid_EC[..., None], x_ND[row_EC], 0)
        return DispatchResult(x_ECD, counts_E, ElasticHandle(handle, recv_w, _Masked(row_EC, valid_EC,
                                                                                     x_ND.shape[0])))

    def combine_start(self, y, handle: ElasticHandle):
        if handle.masked is not None:  # back from [E, C, D] to the delivered rows; invalid entries to a spare row
            m = handle.masked
            rows = torch.where(m.valid_EC, m.row_EC, m.num_rows).flatten()
            y_ND = y.new_zeros(m.num_rows + 1, y.shape[-1]).index_copy_(0, rows, y.flatten(0, 1))[: m.num_rows]
        else:
            y_ND = y
        weighted_ND = y_ND * handle.weights_N.to(y_ND.dtype)[:, None]  # DeepEP's combine does not weight
        combined, _, event = self.buffer.combine(weighted_ND, handle.ep_handle, async_with_compute_stream=True)
        return combined, event

    def combine_wait(self, pending) -> torch.Tensor:
        combined, event = pending
        event.current_stream_wait()
        return combined


def make_deepep_v2_dispatcher(state: ParallelState, hidden_size: int, placement: ExpertPlacement, mode: str,
                              max_tokens_per_rank: int, decode_max_tokens: int, fp8: bool,
                              top_k: int) -> ElasticDeepEPDispatcher:
    """One ElasticBuffer sized from the MoE settings, as DeepEP's README does; needs DeepEP V2 built from
    source (docs/deepep.md)."""
    try:
        from deep_ep import ElasticBuffer
    except ImportError as exc:
        from moe_pd.config.errors import ConfigError

        raise ConfigError("parallel.deepep_api=v2 needs DeepEP >= 2 built from source (see docs/deepep.md); "
                          f"importing deep_ep.ElasticBuffer failed: {exc}") from None
    buffer = ElasticBuffer(state.group, num_max_tokens_per_rank=max_tokens_per_rank, hidden=hidden_size,
                           num_topk=top_k, use_fp8_dispatch=fp8)
    return ElasticDeepEPDispatcher(state, hidden_size, placement, buffer, mode, max_tokens_per_rank,
                                   decode_max_tokens, fp8)
