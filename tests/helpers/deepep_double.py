"""A conformance double of DeepEP's V1 `deep_ep.Buffer` (github.com/deepseek-ai/DeepEP, deep_ep/buffers/legacy.py)
on torch.distributed.

It mirrors the real Python API of DeepEP's main branch (commit dd758ca; the version 2.1.0 package that
also holds `ElasticBuffer`): argument names and defaults, return tuples, handle contents, and the checks
the C++ runtime makes on its inputs (csrc/legacy/buffer.hpp), with gloo all_to_all underneath, so
moe_pd's adapter is tested on CPU and a wrong call fails here as it would on GPUs:

- normal dispatch delivers each token once per rank, rank-major, with *local* expert ids (-1 elsewhere,
  weight 0 there); the handle is the intranode 6-tuple (rank_prefix_matrix, channel_prefix_matrix,
  recv_channel_prefix_matrix, recv_src_idx, is_token_in_rank, send_head) and combine works from it alone,
  adding rows *without* weights; a handle passed to dispatch replays the layout (topk must then be None);
- low-latency dispatch delivers [E_local, R * max_tokens, H] with per-expert counts (e4m3 with
  column-major 1x128 scales when use_fp8), its handle is (src_info, layout_range, max_tokens, hidden,
  num_experts) with layout_range packing (count | begin << 32) per source rank, as DeepEP's kernels do,
  and its combine applies the weights from that handle alone;
- with return_recv_hook the received data is written only when hook() runs; the low-latency buffers are
  double-buffered, so issuing a low-latency call while the hook of the call two before is still pending
  is refused (on GPUs it would silently overwrite the data in flight);
- activations are bf16, as DeepEP's kernels require; tests that compare in fp32 widen
  `Buffer.activation_dtypes` explicitly.
Kernel size tables (supported hidden sizes, rank counts) and timing are DeepEP's, checked on GPUs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_pd.fp8 import quantize_act_1x128

ALIGNMENT = 128  # LEGACY_NUM_BUFFER_ALIGNMENT_BYTES
RANK_COUNTS = (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160)  # get_dispatch_config's table


class EventOverlap:
    """deep_ep.utils.event.EventOverlap without CUDA: waiting is immediate."""

    def __init__(self, event=None, extra_tensors=None) -> None:
        self.event, self.extra_tensors = event, extra_tensors

    def current_stream_wait(self, release_handle: bool = False) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.current_stream_wait()


def exchange(send: torch.Tensor, send_split: list[int], recv_split: list[int], group) -> torch.Tensor:
    if send.dtype == torch.float8_e4m3fn:  # gloo has no fp8: move the bytes
        return exchange(send.view(torch.uint8), send_split, recv_split, group).view(send.dtype)
    recv = send.new_empty(sum(recv_split), *send.shape[1:])
    dist.all_to_all_single(recv, send.contiguous(), recv_split, send_split, group=group)
    return recv


def exchange_counts(send_counts: torch.Tensor, group) -> torch.Tensor:
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts, group=group)
    return recv


class Config:
    """deep_ep._C.Config: SMs and chunk sizes of the normal kernels, and the buffer size hints."""

    def __init__(self, num_sms: int, num_max_nvl_chunked_send_tokens: int, num_max_nvl_chunked_recv_tokens: int,
                 num_max_rdma_chunked_send_tokens: int, num_max_rdma_chunked_recv_tokens: int) -> None:
        assert num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens
        self.num_sms, self.nvl_recv = num_sms, num_max_nvl_chunked_recv_tokens

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        per_token = hidden_bytes + 128 * 8 + 128 * 4 + 128 * 4 + 32  # data, top-k ids, weights, scales, meta
        size = (self.num_sms // 2) * min(num_ranks, 8) * self.nvl_recv * per_token
        return -(-size // ALIGNMENT) * ALIGNMENT

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return 0 if num_ranks <= 8 else self.get_nvl_buffer_size_hint(hidden_bytes, num_ranks)


class Buffer:
    num_sms: int = 20
    activation_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False,
                 comm=None) -> None:
        if group is None:
            raise ValueError("Either 'group' or 'comm' must be provided.")
        assert num_nvl_bytes % ALIGNMENT == 0 and num_rdma_bytes % ALIGNMENT == 0, "buffer sizes must be aligned"
        self.group, self.rank, self.group_size = group, group.rank(), group.size()
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode, self.num_qps_per_rank = low_latency_mode, num_qps_per_rank
        self.calls: list[str] = []
        self._ll_calls = 0
        self._ll_pending: dict[int, str] = {}  # low-latency call number -> name, while its hook has not run

    # static helpers --------------------------------------------------------------------------------------
    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        assert num_ranks in RANK_COUNTS, f"Unsupported number of EP ranks: {num_ranks}"
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        assert num_ranks in RANK_COUNTS, f"Unsupported number of EP ranks: {num_ranks}"
        return Config(Buffer.num_sms, 4, 256, 6, 128)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """csrc/legacy/config.hpp LowLatencyLayout: two send, two receive and two signalling buffers."""
        scales = hidden // 128
        dispatch_msg = 16 + max(hidden * 2, hidden + scales * 4)
        combine_msg = scales * 4 + hidden * 2
        send = max(num_max_dispatch_tokens_per_rank * dispatch_msg, num_experts * num_max_dispatch_tokens_per_rank
                   * combine_msg)
        recv = num_experts * num_max_dispatch_tokens_per_rank * max(dispatch_msg, combine_msg)
        signal = -(-num_experts * 4 // 128) * 128
        total = 2 * (send + recv + signal)
        return (total + ALIGNMENT) // ALIGNMENT * ALIGNMENT

    # normal kernels ---------------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        assert topk_idx.dtype == torch.int64 and topk_idx.dim() == 2, "topk_idx: [tokens, topk] deep_ep.topk_idx_t"
        assert num_experts % self.group_size == 0
        per_rank = num_experts // self.group_size
        valid = topk_idx >= 0
        in_rank = torch.zeros(topk_idx.shape[0], self.group_size, dtype=torch.bool)
        rows, cols = valid.nonzero(as_tuple=True)
        in_rank[rows, topk_idx[rows, cols] // per_rank] = True
        per_expert = torch.bincount(topk_idx[valid], minlength=num_experts).int()
        self.calls.append("get_dispatch_layout")
        return in_rank.sum(0).int(), None, per_expert, in_rank, EventOverlap()

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config=None, previous_event=None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False):
        data, scales = x if isinstance(x, tuple) else (x, None)
        assert data.dtype in self.activation_dtypes + (torch.float8_e4m3fn,), f"x dtype {data.dtype}"
        assert (scales is None) == (data.dtype != torch.float8_e4m3fn), "FP8 x comes as (e4m3, fp32 scales)"
        assert scales is None or tuple(scales.shape) == (data.shape[0], data.shape[1] // 128)
        assert not allocate_on_comm_stream or (previous_event is not None and async_finish)
        if handle is not None:  # cached layout: the routing of the dispatch that made the handle
            assert topk_idx is None and topk_weights is None
            prefix, _, _, src_idx, in_rank, send_head = handle
        else:
            assert None not in (num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert)
            assert topk_weights is None or topk_weights.dtype == torch.float32, "topk_weights must be float32"
            in_rank = is_token_in_rank
        send_rank, send_token = in_rank.t().nonzero(as_tuple=True)  # rank-major, then token order
        send_split = torch.bincount(send_rank, minlength=self.group_size)
        recv_split = exchange_counts(send_split, self.group)
        recv_x = tuple(exchange(t[send_token], send_split.tolist(), recv_split.tolist(), self.group)
                       for t in ((data,) if scales is None else (data, scales)))
        recv_x = recv_x[0] if scales is None else recv_x
        self.calls.append("dispatch")
        if handle is not None:
            return recv_x, None, None, None, None, EventOverlap()
        assert torch.equal(send_split.int(), num_tokens_per_rank.int())
        per_rank = num_tokens_per_expert.shape[0] // self.group_size
        ids = topk_idx[send_token]
        mine = (ids >= 0) & (ids // per_rank == send_rank[:, None])
        local = torch.where(mine, ids - send_rank[:, None] * per_rank, -1)
        weights = torch.where(local >= 0, topk_weights[send_token].float(), 0.0)
        recv_ids = exchange(local, send_split.tolist(), recv_split.tolist(), self.group)
        recv_weights = exchange(weights, send_split.tolist(), recv_split.tolist(), self.group)
        src_idx = exchange(send_token.int(), send_split.tolist(), recv_split.tolist(), self.group)
        counts_RR = [torch.empty_like(send_split) for _ in range(self.group_size)]
        dist.all_gather(counts_RR, send_split, group=self.group)
        prefix = torch.cumsum(torch.stack(counts_RR), 0).int()  # [src rank, dst rank]: rows from ranks <= src
        send_head = torch.full(in_rank.shape, -1, dtype=torch.int32)
        position = torch.arange(len(send_token)) - (torch.cumsum(send_split, 0) - send_split)[send_rank]
        send_head[send_token, send_rank] = position.int()
        counts = torch.bincount(recv_ids[recv_ids >= 0], minlength=per_rank).tolist()
        counts = [-(-c // expert_alignment) * expert_alignment for c in counts]
        channels = torch.zeros(self.group_size, self.num_sms // 2, dtype=torch.int32)
        handle = (prefix, channels, channels.clone(), src_idx, in_rank, send_head)
        return recv_x, recv_ids, recv_weights, counts, handle, EventOverlap()

    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False):
        assert x.dtype in self.activation_dtypes, f"combine takes bf16 rows, got {x.dtype}"
        prefix, _, _, src_idx, in_rank, send_head = handle
        assert x.shape[0] == src_idx.shape[0], "combine rows must be the received rows, in received order"
        recv_split = torch.diff(prefix[:, self.rank], prepend=prefix.new_zeros(1)).tolist()
        send_split = in_rank.sum(0).tolist()
        back = exchange(x, recv_split, send_split, self.group)  # rank-major, token order: as sent
        send_rank, send_token = in_rank.t().nonzero(as_tuple=True)
        start = (torch.cumsum(torch.tensor(send_split), 0) - torch.tensor(send_split))[send_rank]
        assert torch.equal(start + send_head[send_token, send_rank].long(), torch.arange(len(send_token)))
        out = x.new_zeros(in_rank.shape[0], x.shape[1]).index_add_(0, send_token, back)  # no weights
        self.calls.append("combine")
        return out, None, EventOverlap()

    # low-latency kernels ----------------------------------------------------------------------------------
    def _ll_issue(self, name: str, return_recv_hook: bool):
        """Double-buffered low-latency calls: call n + 2 reuses call n's buffer."""
        assert self.low_latency_mode, "low-latency kernels need Buffer(low_latency_mode=True)"
        number = self._ll_calls
        self._ll_calls += 1
        if number - 2 in self._ll_pending:
            raise RuntimeError(f"low-latency {name} issued while the receive hook of "
                               f"{self._ll_pending[number - 2]} (two calls earlier) has not run: DeepEP's two "
                               "low-latency buffers would be overwritten in flight")
        if return_recv_hook:
            self._ll_pending[number] = name
        self.calls.append(f"{name}.send")

        def finish(receive):
            def hook():
                assert number in self._ll_pending, f"the receive hook of {name} ran twice"
                del self._ll_pending[number]
                receive()
            return hook

        return finish

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False):
        assert x.dim() == 2 and x.is_contiguous() and x.dtype in self.activation_dtypes, "x: contiguous bf16"
        assert x.shape[1] % 128 == 0 and topk_idx.dtype == torch.int64 and topk_idx.is_contiguous()
        assert x.shape[0] == topk_idx.shape[0] <= num_max_dispatch_tokens_per_rank
        assert num_experts % self.group_size == 0
        assert not (async_finish and return_recv_hook), "async_finish and return_recv_hook are exclusive"
        assert self.num_qps_per_rank == num_experts // self.group_size, "num_qps_per_rank must equal local experts"
        assert self.num_rdma_bytes >= self.get_low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank, x.shape[1], self.group_size, num_experts), "RDMA buffer too small"
        finish = self._ll_issue("low_latency_dispatch", return_recv_hook)
        tokens, hidden = x.shape
        ranks, per_rank = self.group_size, num_experts // self.group_size
        capacity = ranks * num_max_dispatch_tokens_per_rank
        valid = topk_idx >= 0
        pair_token, pair_k = valid.nonzero(as_tuple=True)
        pair_expert = topk_idx[pair_token, pair_k]
        order = torch.sort(pair_expert, stable=True).indices  # by global expert: rank-major
        pair_token, pair_expert = pair_token[order], pair_expert[order]
        send_split = torch.bincount(pair_expert // per_rank, minlength=ranks)
        recv_split = exchange_counts(send_split, self.group)
        sends, recvs = send_split.tolist(), recv_split.tolist()
        rows = exchange(x[pair_token], sends, recvs, self.group)
        row_expert = exchange(pair_expert % per_rank, sends, recvs, self.group)
        row_token = exchange(pair_token.int(), sends, recvs, self.group)
        row_src = torch.repeat_interleave(torch.arange(ranks), recv_split)
        # Per local expert: source ranks in *descending* order, each rank's tokens in its order (a valid
        # arrival order; the adapter must not assume rank 0 first).
        key = row_expert * ranks + (ranks - 1 - row_src)
        slot_order = torch.sort(key, stable=True).indices
        counts = torch.bincount(row_expert, minlength=per_rank)
        position = torch.arange(len(slot_order)) - (torch.cumsum(counts, 0) - counts)[row_expert[slot_order]]
        src_info = torch.full((per_rank, capacity), -1, dtype=torch.int32)
        src_info[row_expert[slot_order], position] = row_token[slot_order]
        layout = torch.zeros(per_rank, ranks, dtype=torch.int64)
        for e in range(per_rank):
            begin = 0
            for r in reversed(range(ranks)):
                n = int(((row_expert == e) & (row_src == r)).sum())
                layout[e, r] = n | (begin << 32)
                begin += n
        recv = torch.zeros(per_rank, capacity, hidden, dtype=torch.float8_e4m3fn if use_fp8 else x.dtype)
        scales = torch.zeros(per_rank, hidden // 128, capacity).transpose(1, 2) if use_fp8 else None

        def receive():
            got = rows[slot_order]
            where = (row_expert[slot_order], position)
            if use_fp8:
                q, s = quantize_act_1x128(got) if len(got) else (got.to(torch.float8_e4m3fn),
                                                                 got.new_zeros(0, hidden // 128))
                recv[where], scales[where] = q, s
            else:
                recv[where] = got
            self.calls.append("low_latency_dispatch.recv")

        hook = finish(receive)
        if not return_recv_hook:
            hook()
        handle = (src_info, layout, num_max_dispatch_tokens_per_rank, hidden, num_experts)
        return ((recv, scales) if use_fp8 else recv), counts.int(), handle, EventOverlap(), \
            (hook if return_recv_hook else (lambda: None))

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt: bool = False,
                            zero_copy: bool = False, async_finish: bool = False, return_recv_hook: bool = False,
                            out=None, combine_wait_recv_cost_stats=None):
        src_info, layout, max_tokens, hidden, num_experts = handle
        ranks, per_rank = self.group_size, num_experts // self.group_size
        assert x.dim() == 3 and x.is_contiguous() and x.dtype in self.activation_dtypes, "x: contiguous bf16 [E, C, H]"
        assert tuple(x.shape) == (per_rank, ranks * max_tokens, hidden)
        assert topk_idx.dtype == torch.int64 and topk_idx.is_contiguous() and topk_weights.is_contiguous()
        assert topk_weights.dtype == torch.float32 and topk_idx.shape == topk_weights.shape
        assert topk_weights.shape[0] <= max_tokens
        assert not (async_finish and return_recv_hook)
        finish = self._ll_issue("low_latency_combine", return_recv_hook)
        parts, meta = [[] for _ in range(ranks)], [[] for _ in range(ranks)]
        for e in range(per_rank):
            for r in range(ranks):
                count, begin = int(layout[e, r]) & 0xFFFFFFFF, int(layout[e, r]) >> 32
                parts[r].append(x[e, begin:begin + count])
                expert = torch.full((count,), self.rank * per_rank + e, dtype=torch.int64)
                meta[r].append(torch.stack([expert, src_info[e, begin:begin + count].long()], dim=1))
        sends = [sum(len(p) for p in ps) for ps in parts]
        recv_split = exchange_counts(torch.tensor(sends), self.group).tolist()
        back = exchange(torch.cat([t for ps in parts for t in ps]), sends, recv_split, self.group)
        back_meta = exchange(torch.cat([t for ms in meta for t in ms]), sends, recv_split, self.group)
        combined = x.new_zeros(topk_idx.shape[0], hidden) if out is None else out

        def receive():
            combined.zero_()
            token = back_meta[:, 1]
            match = topk_idx[token] == back_meta[:, :1]  # the k whose expert sent this row
            assert bool((match.sum(1) == 1).all()), "a returned row matches no top-k slot of its token"
            weight = (topk_weights[token] * match).sum(1).to(x.dtype)
            combined.index_add_(0, token, back * weight[:, None])  # the LL combine weights
            self.calls.append("low_latency_combine.recv")

        hook = finish(receive)
        if not return_recv_hook:
            hook()
        return combined, EventOverlap(), (hook if return_recv_hook else (lambda: None))
