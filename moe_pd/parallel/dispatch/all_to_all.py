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

import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_pd.config.errors import ConfigError
from moe_pd.fp8 import FP8_DTYPE, dequantize_act_1x128, quantize_act_1x128
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
    return dequantize_act_1x128(q_ND, scale_NG, dtype)


def pack_rows(x_ND: torch.Tensor, meta_NM: torch.Tensor, fp8: bool) -> torch.Tensor:
    """One wire row per token: the activation (or its fp8 packing) followed by fp32 metadata."""
    if fp8:
        return torch.cat([pack_fp8(x_ND), meta_NM.contiguous().view(torch.uint8)], dim=1)
    return torch.cat([x_ND, meta_NM.to(x_ND.dtype)], dim=1) if x_ND.dtype == torch.float32 else \
        torch.cat([x_ND.view(torch.uint8), meta_NM.contiguous().view(torch.uint8)], dim=1)


def unpack_rows(rows: torch.Tensor, hidden: int, meta_width: int, dtype: torch.dtype,
                fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if rows.dtype == torch.float32 and not fp8:
        return rows[:, :hidden], rows[:, hidden:]
    meta_bytes = 4 * meta_width
    body, meta = rows[:, : rows.shape[1] - meta_bytes], rows[:, rows.shape[1] - meta_bytes:]
    meta_NM = meta.contiguous().view(torch.float32) if rows.shape[0] else rows.new_empty(0, meta_width,
                                                                                         dtype=torch.float32)
    if fp8:
        return unpack_fp8(body, hidden, dtype), meta_NM
    x = body.contiguous().view(dtype) if rows.shape[0] else rows.new_empty(0, hidden, dtype=dtype)
    return x, meta_NM


@dataclass
class _Pending:
    recv: torch.Tensor
    meta_width: int
    send_token_S: torch.Tensor
    send_split: list[int]
    recv_split: list[int]
    num_tokens: int
    entry: CommEntry | None
    dtype: torch.dtype
    hidden: int
    completion: "Completion"
    tag: str
    position_S: torch.Tensor | None = None
    """Padded exchange: each sent row's place in the fixed-size send buffer."""
    layer: int = -1


@dataclass
class AllToAllHandle:
    expansion: permute.Expansion
    send_token_S: torch.Tensor
    send_split: list[int]
    recv_split: list[int]
    num_tokens: int
    tag: str
    position_S: torch.Tensor | None = None


class AllToAllDispatcher(Dispatcher):
    def __init__(self, state: ParallelState, hidden_size: int, placement: ExpertPlacement | None = None,
                 recorder: FlightRecorder | None = None, fp8: bool = False, delay_s: float = 0.0,
                 padded_max_tokens: int = 0) -> None:
        if fp8 and hidden_size % 128:
            raise ConfigError(f"parallel.fp8_dispatch needs model.hidden_size % 128 == 0, got {hidden_size}")
        self.state, self.recorder, self.fp8, self.delay_s = state, recorder, fp8, delay_s
        self.padded_max_tokens = padded_max_tokens
        self._capacity: int | None = None
        self.placement = placement
        self.routing_salt = state.rank
        self.num_local_experts = state.experts_per_rank

    def _record(self, op: str, tag: str, send: int, recv: int, nbytes: int) -> CommEntry | None:
        return self.recorder.start(op, tag, send, recv, nbytes) if self.recorder else None

    def _done(self, entry: CommEntry | None) -> None:
        if entry is not None and self.recorder is not None:
            self.recorder.finish(entry)

    def _exchange(self, send: torch.Tensor, send_split: list[int], recv_split: list[int]):
        recv = send.new_empty(sum(recv_split), *send.shape[1:])
        work = dist.all_to_all_single(recv, send, recv_split, send_split, group=self.state.group, async_op=True)
        return recv, work

    def begin_step(self, max_tokens_any_rank: int) -> None:
        """Decode-sized steps (no rank above `padded_max_tokens`) use the padded exchange: every rank sends
        exactly max-tokens rows to every rank, so no counts round trip (a blocking collective) is needed and
        dispatch_start returns at once, as DeepEP's low-latency mode does with its fixed-size buffers."""
        use = 0 < max_tokens_any_rank <= self.padded_max_tokens
        self._capacity = max_tokens_any_rank if use else None

    def dispatch_start(self, x_TD, topk_ids_TK, topk_weights_TK, layer: int = -1):
        ranks = self.state.ep_size
        tag = f"layer{layer}" if layer >= 0 else ""
        phys_TK = self.to_physical(topk_ids_TK, layer)
        send_token_S, send_rank_S, local_ids_SK = permute.token_rank_layout(phys_TK, self.num_local_experts, ranks)
        meta_SK2 = permute.row_metadata(local_ids_SK, topk_weights_TK[send_token_S])
        if self._capacity is not None:
            return self._padded_dispatch_start(x_TD, send_token_S, send_rank_S, meta_SK2, layer)
        send_counts_R = torch.bincount(send_rank_S, minlength=ranks)
        recv_counts_R = torch.empty_like(send_counts_R)
        entry = self._record("dispatch.counts", tag, ranks, ranks, 16 * ranks)
        dist.all_to_all_single(recv_counts_R, send_counts_R, group=self.state.group)
        self._done(entry)
        send_split, recv_split = send_counts_R.tolist(), recv_counts_R.tolist()
        self.record_received(layer, sum(recv_split))
        # Each row carries the token, then K local slot ids and K weights as fp32 (slot ids are small exact
        # integers): one message per destination.
        payload = pack_rows(x_TD[send_token_S], meta_SK2, self.fp8)
        entry = self._record("dispatch", tag, len(send_token_S), sum(recv_split),
                             payload.numel() * payload.element_size())
        recv, work = self._exchange(payload, send_split, recv_split)
        return _Pending(recv, meta_SK2.shape[1], send_token_S, send_split, recv_split,
                        x_TD.shape[0], entry, x_TD.dtype, x_TD.shape[1], Completion([work], self.delay_s), tag)

    def _padded_dispatch_start(self, x_TD, send_token_S, send_rank_S, meta_SK2, layer: int):
        ranks, cap = self.state.ep_size, self._capacity
        tag = f"layer{layer}" if layer >= 0 else ""
        counts_R = torch.bincount(send_rank_S, minlength=ranks)
        starts_R = torch.cumsum(counts_R, 0) - counts_R
        position_S = send_rank_S * cap + torch.arange(len(send_rank_S), device=x_TD.device) - starts_R[send_rank_S]
        top_k = meta_SK2.shape[1] // 2
        meta = torch.cat([meta_SK2.new_full((ranks * cap, top_k), -1.0), meta_SK2.new_zeros(ranks * cap, top_k)], 1)
        meta[position_S] = meta_SK2
        rows = x_TD.new_zeros(ranks * cap, x_TD.shape[1])
        rows[position_S] = x_TD[send_token_S]
        payload = pack_rows(rows, meta, self.fp8)
        split = [cap] * ranks
        entry = self._record("dispatch", tag, len(send_token_S), ranks * cap, payload.numel() * payload.element_size())
        recv, work = self._exchange(payload, split, split)
        return _Pending(recv, meta.shape[1], send_token_S, split, split, x_TD.shape[0], entry, x_TD.dtype,
                        x_TD.shape[1], Completion([work], self.delay_s), tag, position_S, layer)

    def dispatch_wait(self, p: _Pending) -> DispatchResult:
        self._wait(p.completion, p.entry)
        recv_x, recv_meta = unpack_rows(p.recv, p.hidden, p.meta_width, p.dtype, self.fp8)
        local_ids_NK, weights_NK = permute.split_row_metadata(recv_meta)
        x_MD, expansion = permute.expand(recv_x, local_ids_NK, weights_NK, self.num_local_experts)
        if p.position_S is not None:  # padded: real rows are those with a local expert
            self.record_received(p.layer, int((local_ids_NK >= 0).any(dim=1).sum()))
        handle = AllToAllHandle(expansion, p.send_token_S, p.send_split, p.recv_split, p.num_tokens, p.tag,
                                p.position_S)
        return DispatchResult(x_MD, expansion.counts_E, handle)

    def combine_start(self, y_MD, handle: AllToAllHandle):
        partial_ND = permute.reduce(y_MD, handle.expansion)
        entry = self._record("combine", handle.tag, partial_ND.shape[0], sum(handle.send_split),
                             partial_ND.numel() * partial_ND.element_size())
        back_SD, work = self._exchange(partial_ND, handle.recv_split, handle.send_split)
        return Completion([work], self.delay_s), entry, back_SD, handle

    def combine_wait(self, pending) -> torch.Tensor:
        completion, entry, back_SD, handle = pending
        self._wait(completion, entry)
        if handle.position_S is not None:
            back_SD = back_SD[handle.position_S]
        out_TD = back_SD.new_zeros(handle.num_tokens, back_SD.shape[1])
        return out_TD.index_add_(0, handle.send_token_S, back_SD)  # rank order: rows are rank-major

    def _wait(self, completion: "Completion", entry: CommEntry | None) -> None:
        completion.wait()
        self._done(entry)


class Completion:
    """Async work handles; with `delay_s` > 0 (testing.comm_delay_ms, a test knob emulating network latency)
    a watcher thread notes when the transfer really finished, and `wait` returns `delay_s` after that, so
    compute placed between start and wait hides the added latency exactly as it would a slow link."""

    def __init__(self, works: list, delay_s: float = 0.0) -> None:
        self.works, self.delay_s = works, delay_s
        self._done_at = 0.0
        self._watcher = None
        if delay_s > 0:
            self._watcher = threading.Thread(target=self._watch, daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        for work in self.works:
            work.wait()
        self._done_at = time.monotonic() + self.delay_s

    def wait(self) -> None:
        if self._watcher is not None:
            self._watcher.join()
            remaining = self._done_at - time.monotonic()
            if remaining > 0:
                time.sleep(remaining)
        for work in self.works:
            work.wait()
