"""EP dispatch over torch.distributed `all_to_all_single` (gloo and NCCL): counts first, then payload.

Legend: T tokens on this rank, D hidden, K top-k, R EP ranks, E local experts per rank, N rows.

Logical ids are first routed to physical slots (placement.py; slot p lives on rank p // E). Dispatch
sends one row per (token, chosen expert), ordered by physical slot, which is rank-major and
local-slot-minor, so the send split per rank is a sum of counts. Receivers get rows source-rank-major and regroup them
expert-major. Combine reverses both steps and sums each token's K results in k order (base.py), so the
output matches the local backend. With `fp8`, payload rows travel as e4m3 bytes plus per-token 1x128
fp32 scales packed into one uint8 row, as DeepSeek's dispatch does; combine stays in the activation dtype.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_pd.config.errors import ConfigError
from moe_pd.model.fp8 import FP8_DTYPE, quantize_act_1x128
from moe_pd.parallel.dispatch.base import Dispatcher, DispatchResult, weighted_sum_over_k
from moe_pd.parallel.dispatch.local import group_by_expert
from moe_pd.parallel.flight_recorder import CommEntry, FlightRecorder
from moe_pd.parallel.placement import ExpertPlacement
from moe_pd.parallel.state import ParallelState


def expert_major_order(counts_RE: torch.Tensor) -> torch.Tensor:
    """Row indices that turn source-major rows ([r][e] blocks) into expert-major ([e][r] blocks)."""
    flat_counts = counts_RE.reshape(-1)
    starts_RE = (torch.cumsum(flat_counts, 0) - flat_counts).view_as(counts_RE)
    counts_ER, starts_ER = counts_RE.t().reshape(-1), starts_RE.t().reshape(-1)
    total = int(flat_counts.sum())
    block_start = torch.repeat_interleave(starts_ER, counts_ER)
    out_start = torch.repeat_interleave(torch.cumsum(counts_ER, 0) - counts_ER, counts_ER)
    return block_start + torch.arange(total, device=counts_RE.device) - out_start


def pack_fp8(x_ND: torch.Tensor) -> torch.Tensor:
    """[N, D] -> uint8 [N, D + 4 * D / 128]: e4m3 bytes, then the fp32 scale of each 128 channels."""
    n, hidden = x_ND.shape
    if n == 0:
        return x_ND.new_empty(0, hidden + 4 * (hidden // 128), dtype=torch.uint8)
    q_ND, scale_NG = quantize_act_1x128(x_ND)
    return torch.cat([q_ND.view(torch.uint8), scale_NG.contiguous().view(torch.uint8)], dim=1)


def unpack_fp8(packed: torch.Tensor, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    n = packed.shape[0]
    if n == 0:
        return packed.new_empty(0, hidden, dtype=dtype)
    q_ND = packed[:, :hidden].contiguous().view(FP8_DTYPE)
    scale_NG = packed[:, hidden:].contiguous().view(torch.float32)
    return (q_ND.float().view(n, hidden // 128, 128) * scale_NG[..., None]).view(n, hidden).to(dtype)


@dataclass
class _PendingDispatch:
    work: object
    recv: torch.Tensor
    recv_counts_RE: torch.Tensor
    slot_N: torch.Tensor
    send_split: list[int]
    recv_split: list[int]
    topk_weights_TK: torch.Tensor
    entry: CommEntry | None
    dtype: torch.dtype
    hidden: int
    ready_at: float


@dataclass
class AllToAllHandle:
    order_N: torch.Tensor
    slot_N: torch.Tensor
    send_split: list[int]
    recv_split: list[int]
    topk_weights_TK: torch.Tensor
    tag: str


class AllToAllDispatcher(Dispatcher):
    def __init__(self, state: ParallelState, hidden_size: int, placement: ExpertPlacement | None = None,
                 recorder: FlightRecorder | None = None, fp8: bool = False, delay_s: float = 0.0) -> None:
        if fp8 and hidden_size % 128:
            raise ConfigError(f"parallel.fp8_dispatch needs model.hidden_size % 128 == 0, got {hidden_size}")
        self.state, self.recorder, self.fp8, self.delay_s = state, recorder, fp8, delay_s
        self.placement = placement
        self.num_local_experts = state.experts_per_rank
        self.group = state.group

    def _record(self, op: str, tag: str, send: int, recv: int, nbytes: int) -> CommEntry | None:
        return self.recorder.start(op, tag, send, recv, nbytes) if self.recorder else None

    def _done(self, entry: CommEntry | None) -> None:
        if entry is not None and self.recorder is not None:
            self.recorder.finish(entry)

    def dispatch_start(self, x_TD, topk_ids_TK, topk_weights_TK, layer: int = -1):
        ranks, experts = self.state.ep_size, self.num_local_experts
        tag = f"layer{layer}" if layer >= 0 else ""
        if self.placement is not None:
            topk_ids_TK = self.placement.route(topk_ids_TK, layer)
        order, counts_G, num_valid = group_by_expert(topk_ids_TK, ranks * experts)
        slot_N = order[:num_valid]
        send_counts_RE = counts_G.view(ranks, experts)
        recv_counts_RE = torch.empty_like(send_counts_RE)
        entry = self._record("dispatch.counts", tag, ranks * experts, ranks * experts, 16 * ranks * experts)
        dist.all_to_all_single(recv_counts_RE.view(-1), send_counts_RE.reshape(-1), group=self.group)
        self._done(entry)
        send_split, recv_split = send_counts_RE.sum(1).tolist(), recv_counts_RE.sum(1).tolist()
        payload = x_TD[slot_N // topk_ids_TK.shape[1]]
        if self.fp8:
            payload = pack_fp8(payload)
        recv = payload.new_empty(sum(recv_split), payload.shape[1])
        entry = self._record("dispatch", tag, num_valid, recv.shape[0], payload.numel() * payload.element_size())
        work = dist.all_to_all_single(recv, payload, recv_split, send_split, group=self.group, async_op=True)
        return _PendingDispatch(work, recv, recv_counts_RE, slot_N, send_split, recv_split, topk_weights_TK, entry,
                                x_TD.dtype, x_TD.shape[1], time.monotonic() + self.delay_s), tag

    def dispatch_wait(self, pending) -> DispatchResult:
        p, tag = pending
        self._wait(p.work, p.entry, p.ready_at)
        recv = unpack_fp8(p.recv, p.hidden, p.dtype) if self.fp8 else p.recv
        order_N = expert_major_order(p.recv_counts_RE)
        handle = AllToAllHandle(order_N, p.slot_N, p.send_split, p.recv_split, p.topk_weights_TK, tag)
        return DispatchResult(recv[order_N], p.recv_counts_RE.sum(0), handle)

    def combine_start(self, y_ND, handle: AllToAllHandle):
        back = torch.empty_like(y_ND)
        back[handle.order_N] = y_ND
        out = y_ND.new_empty(sum(handle.send_split), y_ND.shape[1])
        entry = self._record("combine", handle.tag, back.shape[0], out.shape[0], back.numel() * back.element_size())
        work = dist.all_to_all_single(out, back, handle.send_split, handle.recv_split, group=self.group,
                                      async_op=True)
        return work, entry, out, handle, time.monotonic() + self.delay_s

    def combine_wait(self, pending) -> torch.Tensor:
        work, entry, out, handle, ready_at = pending
        self._wait(work, entry, ready_at)
        return weighted_sum_over_k(out, handle.slot_N, handle.topk_weights_TK)

    def _wait(self, work, entry: CommEntry | None, ready_at: float) -> None:
        """Waits for the transfer; with `delay_s` (a test knob emulating a slow network) not before
        `delay_s` after it started, so compute placed between start and wait hides the delay."""
        remaining = ready_at - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        work.wait()
        self._done(entry)
