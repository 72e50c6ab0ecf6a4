"""A conformance double of DeepEP's V1 `deep_ep.Buffer` (github.com/deepseek-ai/DeepEP) on torch.distributed.

It implements the documented *semantics* of the calls moe_pd's adapter makes, with gloo all_to_all
underneath, so the adapter's bookkeeping is tested on CPU: normal dispatch delivers each token once per
rank with local expert ids (-1 elsewhere, weight 0 there) and combine adds rows without weights;
low-latency dispatch delivers the masked [E_local, R * max_tok, H] layout with per-expert counts (cast to
e4m3 with 1x128 scales inside when use_fp8), its combine applies the weights; with return_recv_hook the
received data is only valid after hook() is called. Kernel size tables (supported hidden sizes, rank
counts) are not enforced: those are DeepEP's, checked on GPUs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_pd.fp8 import quantize_act_1x128


class EventOverlap:
    def current_stream_wait(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.current_stream_wait()


def _exchange(send: torch.Tensor, send_split: list[int], recv_split: list[int], group) -> torch.Tensor:
    if send.dtype == torch.float8_e4m3fn:  # gloo has no fp8: move the bytes
        return _exchange(send.view(torch.uint8), send_split, recv_split, group).view(send.dtype)
    recv = send.new_empty(sum(recv_split), *send.shape[1:])
    dist.all_to_all_single(recv, send.contiguous(), recv_split, send_split, group=group)
    return recv


def _counts(send_counts: torch.Tensor, group) -> torch.Tensor:
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts, group=group)
    return recv


class Buffer:
    num_sms = 20

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, **_ignored) -> None:
        self.group = group
        self.rank, self.num_ranks = dist.get_rank(group), dist.get_world_size(group)
        self.low_latency_mode = low_latency_mode
        self.calls: list[str] = []

    # normal kernels ---------------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        assert topk_idx.dtype == torch.int64, "topk_idx must be int64 (deep_ep.topk_idx_t)"
        per_rank = num_experts // self.num_ranks
        valid = topk_idx >= 0
        in_rank = torch.zeros(topk_idx.shape[0], self.num_ranks, dtype=torch.bool)
        rows, cols = valid.nonzero(as_tuple=True)
        in_rank[rows, topk_idx[rows, cols] // per_rank] = True
        per_expert = torch.bincount(topk_idx[valid], minlength=num_experts).int()
        self.calls.append("get_dispatch_layout")
        return in_rank.sum(0).int(), None, per_expert, in_rank, EventOverlap()

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config=None, previous_event=None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False):
        assert handle is None, "the double does not replay cached layouts"
        assert not allocate_on_comm_stream or (previous_event is not None and async_finish)
        per_rank = num_tokens_per_expert.shape[0] // self.num_ranks
        send_rank, send_token = is_token_in_rank.t().nonzero(as_tuple=True)  # rank-major, then token order
        send_split = torch.bincount(send_rank, minlength=self.num_ranks)
        assert torch.equal(send_split.int(), num_tokens_per_rank.int())
        recv_split = _counts(send_split, self.group).tolist()
        send_split = send_split.tolist()
        ids = topk_idx[send_token]
        local = torch.where((ids >= 0) & (ids // per_rank == send_rank[:, None]), ids - send_rank[:, None] * per_rank,
                            -1)
        weights = torch.where(local >= 0, topk_weights[send_token].float(), 0.0)
        if isinstance(x, tuple):
            recv_x = tuple(_exchange(t[send_token], send_split, recv_split, self.group) for t in x)
        else:
            recv_x = _exchange(x[send_token], send_split, recv_split, self.group)
        recv_ids = _exchange(local, send_split, recv_split, self.group)
        recv_weights = _exchange(weights, send_split, recv_split, self.group)
        counts = torch.bincount(recv_ids[recv_ids >= 0], minlength=per_rank).tolist()
        counts = [-(-c // expert_alignment) * expert_alignment for c in counts]
        self.calls.append("dispatch")
        return recv_x, recv_ids, recv_weights, counts, (send_token, send_split, recv_split, len(is_token_in_rank)), \
            EventOverlap()

    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False):
        send_token, send_split, recv_split, num_tokens = handle
        back = _exchange(x, recv_split, send_split, self.group)
        out = x.new_zeros(num_tokens, x.shape[1]).index_add_(0, send_token, back)  # no weights: DeepEP's contract
        self.calls.append("combine")
        return out, None, EventOverlap()

    # low-latency kernels ----------------------------------------------------------------------------------
    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False):
        assert self.low_latency_mode, "low-latency kernels need Buffer(low_latency_mode=True)"
        assert not (async_finish and return_recv_hook), "async_finish and return_recv_hook are exclusive"
        tokens, hidden = x.shape
        assert tokens <= num_max_dispatch_tokens_per_rank
        per_rank, capacity = num_experts // self.num_ranks, self.num_ranks * num_max_dispatch_tokens_per_rank
        valid = topk_idx >= 0
        flat = torch.where(valid, topk_idx, num_experts).reshape(-1)
        order = torch.sort(flat, stable=True).indices[: int(valid.sum())]  # by global expert: rank-major
        pair_token, pair_k = order // topk_idx.shape[1], order % topk_idx.shape[1]
        pair_expert = flat[order]
        send_split = torch.bincount(pair_expert // per_rank, minlength=self.num_ranks)
        recv_split = _counts(send_split, self.group).tolist()
        send_split = send_split.tolist()
        recv_rows = _exchange(x[pair_token], send_split, recv_split, self.group)
        recv_expert = _exchange(pair_expert % per_rank, send_split, recv_split, self.group)
        # Pack per local expert: expert-major, then source rank, then token order.
        slot_order = torch.sort(recv_expert, stable=True).indices
        counts = torch.bincount(recv_expert, minlength=per_rank)
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(len(slot_order)) - starts[recv_expert[slot_order]]
        recv = x.new_zeros(per_rank, capacity, hidden)
        scales = torch.zeros(per_rank, capacity, hidden // 128) if use_fp8 else None
        q_recv = torch.zeros(per_rank, capacity, hidden, dtype=torch.float8_e4m3fn) if use_fp8 else None

        def receive():
            rows = recv_rows[slot_order]
            if use_fp8:
                q, s = quantize_act_1x128(rows) if len(rows) else (rows.to(torch.float8_e4m3fn),
                                                                   rows.new_zeros(0, hidden // 128))
                q_recv[recv_expert[slot_order], position] = q
                scales[recv_expert[slot_order], position] = s
            else:
                recv[recv_expert[slot_order], position] = rows
            self.calls.append("low_latency_dispatch.recv")

        handle = (pair_token, pair_k, send_split, recv_split, slot_order, recv_expert, position, tokens)
        self.calls.append("low_latency_dispatch.send")
        if not return_recv_hook:
            receive()
        out = (q_recv, scales) if use_fp8 else recv
        return out, counts.int(), handle, EventOverlap(), (receive if return_recv_hook else (lambda: None))

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt: bool = False,
                            zero_copy: bool = False, async_finish: bool = False, return_recv_hook: bool = False,
                            out=None):
        assert not (async_finish and return_recv_hook)
        pair_token, pair_k, send_split, recv_split, slot_order, recv_expert, position, tokens = handle
        rows = torch.empty(len(slot_order), x.shape[-1], dtype=x.dtype)
        rows[slot_order] = x[recv_expert[slot_order], position]  # back to the order they arrived in
        back = _exchange(rows, recv_split, send_split, self.group)
        combined = x.new_zeros(tokens, x.shape[-1]) if out is None else out.zero_()

        def receive():
            weights = topk_weights[pair_token, pair_k].to(x.dtype)
            combined.index_add_(0, pair_token, back * weights[:, None])  # the LL combine weights
            self.calls.append("low_latency_combine.recv")

        self.calls.append("low_latency_combine.send")
        if not return_recv_hook:
            receive()
        return combined, EventOverlap(), (receive if return_recv_hook else (lambda: None))
