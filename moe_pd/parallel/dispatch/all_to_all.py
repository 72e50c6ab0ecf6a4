"""EP dispatch over torch.distributed `all_to_all_single` (gloo and NCCL), token-deduplicated as DeepEP.

Legend: T tokens on this rank, D hidden, K top-k, R EP ranks, E local expert slots per rank,
S (token, destination rank) pairs sent, N token rows received.

Logical ids are first routed to physical slots (placement.py; slot p lives on rank p // E). Each token
travels once to each rank that holds at least one of its experts, with its K local slot ids there (-1
elsewhere) and weights: counts first (blocking), then metadata and payload (asynchronous). The receiver
lays the rows out expert-major (permute.py); combine reduces each row's expert outputs with their weights
on the expert side, sends one partial sum per row back, and the sender adds the partials in rank order.
With `fp8`, payload rows travel as e4m3 bytes plus per-token 1x128 fp32 scales packed into one uint8 row,
as DeepSeek's dispatch does; combine stays in the activation dtype.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_pd.config.errors import ConfigError
from moe_pd.model.fp8 import FP8_DTYPE, quantize_act_1x128
from moe_pd.parallel.dispatch import permute
from moe_pd.parallel.dispatch.base import Dispatcher, DispatchResult
from moe_pd.parallel.flight_recorder import CommEntry, FlightRecorder
from moe_pd.parallel.placement import ExpertPlacement
from moe_pd.parallel.state import ParallelState


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
class _Pending:
    works: list
    recv_x: torch.Tensor
    recv_meta: torch.Tensor
    send_token_S: torch.Tensor
    send_split: list[int]
    recv_split: list[int]
    num_tokens: int
    entry: CommEntry | None
    dtype: torch.dtype
    hidden: int
    ready_at: float
    tag: str


@dataclass
class AllToAllHandle:
    expansion: permute.Expansion
    send_token_S: torch.Tensor
    send_split: list[int]
    recv_split: list[int]
    num_tokens: int
    tag: str


class AllToAllDispatcher(Dispatcher):
    def __init__(self, state: ParallelState, hidden_size: int, placement: ExpertPlacement | None = None,
                 recorder: FlightRecorder | None = None, fp8: bool = False, delay_s: float = 0.0) -> None:
        if fp8 and hidden_size % 128:
            raise ConfigError(f"parallel.fp8_dispatch needs model.hidden_size % 128 == 0, got {hidden_size}")
        self.state, self.recorder, self.fp8, self.delay_s = state, recorder, fp8, delay_s
        self.placement = placement
        self.routing_salt = state.rank
        self.num_local_experts = state.experts_per_rank
        self.group = state.group

    def _record(self, op: str, tag: str, send: int, recv: int, nbytes: int) -> CommEntry | None:
        return self.recorder.start(op, tag, send, recv, nbytes) if self.recorder else None

    def _done(self, entry: CommEntry | None) -> None:
        if entry is not None and self.recorder is not None:
            self.recorder.finish(entry)

    def _exchange(self, send: torch.Tensor, send_split: list[int], recv_split: list[int]):
        recv = send.new_empty(sum(recv_split), *send.shape[1:])
        work = dist.all_to_all_single(recv, send, recv_split, send_split, group=self.group, async_op=True)
        return recv, work

    def dispatch_start(self, x_TD, topk_ids_TK, topk_weights_TK, layer: int = -1):
        ranks = self.state.ep_size
        tag = f"layer{layer}" if layer >= 0 else ""
        phys_TK = self.to_physical(topk_ids_TK, layer)
        send_token_S, send_rank_S, local_ids_SK = permute.token_rank_layout(phys_TK, self.num_local_experts, ranks)
        send_counts_R = torch.bincount(send_rank_S, minlength=ranks)
        recv_counts_R = torch.empty_like(send_counts_R)
        entry = self._record("dispatch.counts", tag, ranks, ranks, 16 * ranks)
        dist.all_to_all_single(recv_counts_R, send_counts_R, group=self.group)
        self._done(entry)
        send_split, recv_split = send_counts_R.tolist(), recv_counts_R.tolist()
        self.record_received(layer, sum(recv_split))
        # Metadata row: K local slot ids then K weights, as fp32 (slot ids are small exact integers).
        meta_SK2 = torch.cat([local_ids_SK.float(), topk_weights_TK[send_token_S].float()], dim=1)
        payload = x_TD[send_token_S]
        if self.fp8:
            payload = pack_fp8(payload)
        entry = self._record("dispatch", tag, len(send_token_S), sum(recv_split),
                             payload.numel() * payload.element_size() + meta_SK2.numel() * 4)
        recv_meta, work_meta = self._exchange(meta_SK2, send_split, recv_split)
        recv_x, work_x = self._exchange(payload, send_split, recv_split)
        return _Pending([work_meta, work_x], recv_x, recv_meta, send_token_S, send_split, recv_split,
                        x_TD.shape[0], entry, x_TD.dtype, x_TD.shape[1], time.monotonic() + self.delay_s, tag)

    def dispatch_wait(self, p: _Pending) -> DispatchResult:
        self._wait(p.works, p.entry, p.ready_at)
        recv_x = unpack_fp8(p.recv_x, p.hidden, p.dtype) if self.fp8 else p.recv_x
        top_k = p.recv_meta.shape[1] // 2
        local_ids_NK = p.recv_meta[:, :top_k].long()
        x_MD, expansion = permute.expand(recv_x, local_ids_NK, p.recv_meta[:, top_k:], self.num_local_experts)
        handle = AllToAllHandle(expansion, p.send_token_S, p.send_split, p.recv_split, p.num_tokens, p.tag)
        return DispatchResult(x_MD, expansion.counts_E, handle)

    def combine_start(self, y_MD, handle: AllToAllHandle):
        partial_ND = permute.reduce(y_MD, handle.expansion)
        entry = self._record("combine", handle.tag, partial_ND.shape[0], sum(handle.send_split),
                             partial_ND.numel() * partial_ND.element_size())
        back_SD, work = self._exchange(partial_ND, handle.recv_split, handle.send_split)
        return work, entry, back_SD, handle, time.monotonic() + self.delay_s

    def combine_wait(self, pending) -> torch.Tensor:
        work, entry, back_SD, handle, ready_at = pending
        self._wait([work], entry, ready_at)
        out_TD = back_SD.new_zeros(handle.num_tokens, back_SD.shape[1])
        return out_TD.index_add_(0, handle.send_token_S, back_SD)  # rank order: rows are rank-major

    def _wait(self, works: list, entry: CommEntry | None, ready_at: float) -> None:
        """Waits for the transfer; with `delay_s` (a test knob emulating a slow network) not before
        `delay_s` after it started, so compute placed between start and wait hides the delay."""
        remaining = ready_at - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        for work in works:
            work.wait()
        self._done(entry)
