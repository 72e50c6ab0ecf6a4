"""A conformance double of DeepEP's V2 `deep_ep.ElasticBuffer` and `EPHandle` (deep_ep/buffers/elastic.py,
DeepEP commit dd758ca, package 2.1.0) on torch.distributed (gloo), for moe_pd's V2 adapter on CPU.

It mirrors the real signatures, return tuples and `EPHandle` attributes, the host-side checks of
csrc/elastic/buffer.hpp, and what the kernels leave in the outputs (deep_ep/include/deep_ep/impls/
dispatch_copy_epilogue.cuh), so a wrong call or a wrong reading of the results fails here:

- one `dispatch` for every step size. Tokens go once to each rank holding one of their experts, rows
  rank-major (psum_num_recv_tokens_per_scaleup_rank is the inclusive prefix per source rank) but in no
  particular order within a rank (here: reversed). Non-expand: recv_topk_idx holds *local* ids (-1
  elsewhere) and recv_topk_weights all K weights as sent (the other ranks' too). Expand (`do_expand`):
  one row per (token, local expert), grouped by expert, expert e starting at align(psum[e-1]) with
  num_unaligned_recv_tokens_per_expert[e] real rows; recv_topk_weights is 1-D, one weight per row.
- `do_cpu_sync=False` (default True, and forced False with a cached handle): tensors are sized for the
  worst case (R * max tokens; expanded R * max * min(K, E_local) + alignment padding); rows past the
  real ones hold garbage (NaN data, valid-looking expert ids), num_recv_tokens_per_expert_list is empty
  and only the device tensors know the counts.
- a cached `handle` replays the layout of the dispatch that made it: topk_idx must be None, the
  routing is the handle's; no CPU sync.
- `combine` adds rows *without* weights (topk_weights only travel back reduced); expand mode sums each
  token's expert rows through recv_src_metadata[:, 2:].
- buffers are sized at construction (num_max_tokens_per_rank, hidden, top-k, FP8) and every dispatch is
  checked against that size, as the C++ runtime does.
Activations are bf16 as DeepEP's kernels require; tests comparing in fp32 widen `activation_dtypes`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from helpers.deepep_double import EventOverlap, exchange, exchange_counts


def _align(x: int, a: int) -> int:
    return -(-x // a) * a


def _dispatch_bytes(num_max_tokens_per_rank: int, hidden: int, num_sf_packs: int, num_topk: int,
                    element_size: int, num_ranks: int) -> int:
    """Receive space for R ranks' worth of tokens: data, scales, top-k ids, weights and source index."""
    per_token = _align(hidden * element_size + num_sf_packs * 4 + num_topk * (8 + 4) + 16, 16)
    return _align(num_ranks * num_max_tokens_per_rank * per_token, 2 << 20)


class EPHandle:
    def __init__(self, do_expand, num_experts, expert_alignment, num_max_tokens_per_rank, num_sms, topk_idx,
                 num_recv_tokens, num_expanded_tokens, num_recv_tokens_per_expert_list,
                 psum_num_recv_tokens_per_scaleup_rank, psum_num_recv_tokens_per_expert,
                 num_unaligned_recv_tokens_per_expert, recv_src_metadata, dst_buffer_slot_idx,
                 token_metadata_at_forward, channel_linked_list):
        assert topk_idx is not None
        self.do_expand, self.num_experts, self.expert_alignment = do_expand, num_experts, expert_alignment
        self.num_max_tokens_per_rank, self.num_sms, self.topk_idx = num_max_tokens_per_rank, num_sms, topk_idx
        self.psum_num_recv_tokens_per_scaleup_rank = psum_num_recv_tokens_per_scaleup_rank
        self.psum_num_recv_tokens_per_expert = psum_num_recv_tokens_per_expert
        self.num_unaligned_recv_tokens_per_expert = num_unaligned_recv_tokens_per_expert
        self.num_recv_tokens_per_expert_list = num_recv_tokens_per_expert_list
        self.recv_src_metadata, self.dst_buffer_slot_idx = recv_src_metadata, dst_buffer_slot_idx
        self.token_metadata_at_forward, self.channel_linked_list = token_metadata_at_forward, channel_linked_list
        self.num_recv_tokens, self.num_expanded_tokens = num_recv_tokens, num_expanded_tokens


class ElasticBuffer:
    activation_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)

    def __init__(self, group, num_bytes=None, num_cpu_bytes: int = 0, num_max_tokens_per_rank: int = 0,
                 hidden: int = 0, num_topk: int = 0, use_fp8_dispatch: bool = False, deterministic: bool = False,
                 allow_hybrid_mode: bool = True, allow_multiple_reduction: bool = True,
                 prefer_overlap_with_compute: bool = True, sl_idx: int = 3, num_allocated_qps: int = 0,
                 num_cpu_timeout_secs: int = 300, num_gpu_timeout_secs: int = 100,
                 explicitly_destroy: bool = False):
        self.group, self.rank_idx, self.num_ranks = group, group.rank(), group.size()
        self.allow_multiple_reduction = allow_multiple_reduction
        if num_bytes is None:
            num_bytes = ElasticBuffer.get_buffer_size_hint(group, num_max_tokens_per_rank, hidden, num_topk,
                                                           use_fp8_dispatch, allow_hybrid_mode,
                                                           allow_multiple_reduction)
        self.num_bytes, self.num_max_tokens_per_rank = num_bytes, num_max_tokens_per_rank
        self.num_allocated_qps = num_allocated_qps or 17
        self.explicitly_destroy = explicitly_destroy
        self.runtime = object()
        self.calls: list[str] = []
        dist.barrier(group=group)

    def destroy(self) -> None:
        assert self.explicitly_destroy
        self.runtime = None

    @staticmethod
    def get_buffer_size_hint(group, num_max_tokens_per_rank: int, hidden: int, num_topk: int = 0,
                             use_fp8_dispatch: bool = False, allow_hybrid_mode: bool = True,
                             allow_multiple_reduction: bool = True) -> int:
        sf_packs = hidden // 128 if use_fp8_dispatch else 0
        return _dispatch_bytes(num_max_tokens_per_rank, hidden, sf_packs, num_topk or 32,
                               1 if use_fp8_dispatch else 2, group.size())

    def get_theoretical_num_sms(self, num_experts: int, num_topk: int, num_scaleout_topk: int = 0,
                                rdma_gbs: float = 0, nvlink_gbs: float = 0, sm_read_gbs: float = 200,
                                sm_write_gbs: float = 50) -> int:
        assert num_experts is not None and num_experts % self.num_ranks == 0, "num_experts is required"
        return 8

    def get_theoretical_num_qps(self, num_sms: int) -> int:
        return min(num_sms * 16 + 1, self.num_allocated_qps)

    # dispatch ---------------------------------------------------------------------------------------------
    def dispatch(self, x, topk_idx=None, topk_weights=None, cumulative_local_expert_recv_stats=None,
                 num_experts=None, num_max_tokens_per_rank=None, expert_alignment=None, num_sms: int = 0,
                 num_qps: int = 0, previous_event=None, previous_event_before_epilogue=None,
                 async_with_compute_stream: bool = False, allocate_on_comm_stream: bool = False, handle=None,
                 do_handle_copy: bool = True, do_cpu_sync=None, do_expand: bool = False,
                 do_zero_padding: bool = False, use_tma_aligned_col_major_sf: bool = False):
        cached = handle is not None
        if cached:
            assert topk_idx is None, "a cached dispatch takes its routing from the handle"
            assert do_cpu_sync is None or not do_cpu_sync, "Cannot do CPU sync with cached handle"
            topk_idx, do_cpu_sync = handle.topk_idx, False
            num_experts = num_experts if num_experts is not None else handle.num_experts
            expert_alignment = expert_alignment if expert_alignment is not None else handle.expert_alignment
            num_max_tokens_per_rank = num_max_tokens_per_rank or handle.num_max_tokens_per_rank
            assert (num_experts, expert_alignment, num_max_tokens_per_rank) == \
                (handle.num_experts, handle.expert_alignment, handle.num_max_tokens_per_rank)
            assert do_expand == handle.do_expand, "a cached dispatch keeps the handle's layout"
        num_sms = num_sms or self.get_theoretical_num_sms(num_experts, topk_idx.shape[1])
        assert (num_qps or self.get_theoretical_num_qps(num_sms)) <= self.num_allocated_qps, "too few QPs"
        num_max_tokens_per_rank = num_max_tokens_per_rank or self.num_max_tokens_per_rank
        expert_alignment = expert_alignment if expert_alignment is not None else 1
        do_cpu_sync = True if do_cpu_sync is None else do_cpu_sync
        assert not do_zero_padding or do_expand, "zero padding needs expand mode"
        assert previous_event is None or allocate_on_comm_stream, "previous_event needs allocate_on_comm_stream"
        data, sf = x if isinstance(x, tuple) else (x, None)
        assert data.dim() == 2 and data.is_contiguous(), "x: contiguous [tokens, hidden]"
        assert (sf is not None) == (data.dtype == torch.float8_e4m3fn), "FP8 x comes as (e4m3, scales)"
        assert data.dtype in self.activation_dtypes + (torch.float8_e4m3fn,), f"x dtype {data.dtype}"
        tokens, hidden = data.shape
        assert tokens <= num_max_tokens_per_rank, f"{tokens} tokens > num_max_tokens_per_rank"
        assert topk_idx.dtype == torch.int64 and topk_idx.is_contiguous() and topk_idx.shape[0] == tokens
        assert topk_weights is None or (topk_weights.dtype == torch.float32 and topk_weights.is_contiguous())
        num_topk, ranks = topk_idx.shape[1], self.num_ranks
        assert num_experts % ranks == 0
        assert _dispatch_bytes(num_max_tokens_per_rank, hidden, 0 if sf is None else sf.shape[1], num_topk,
                               data.element_size(), ranks) <= self.num_bytes, "the ElasticBuffer is too small"
        per_rank = num_experts // ranks
        if cached:
            assert tuple(handle.dst_buffer_slot_idx.shape) == (tokens, num_topk), "cached handle: other token count"
        # Send: each token once per destination rank, rank-major.
        dest = torch.where(topk_idx >= 0, topk_idx // per_rank, -1)
        in_rank = torch.stack([(dest == r).any(1) for r in range(ranks)], 1) if tokens else \
            torch.zeros(0, ranks, dtype=torch.bool)
        send_rank, send_token = in_rank.t().nonzero(as_tuple=True)
        sends = torch.bincount(send_rank, minlength=ranks)
        recv_counts = exchange_counts(sends, self.group)
        s, r = sends.tolist(), recv_counts.tolist()
        move = lambda t: exchange(t, s, r, self.group)  # noqa: E731
        got_x = move(data[send_token])
        got_sf = move(sf[send_token]) if sf is not None else None
        got_ids = move(topk_idx[send_token])
        got_w = move(topk_weights[send_token]) if topk_weights is not None else None
        got_src = move((self.rank_idx * num_max_tokens_per_rank + send_token).int())
        # Arrival order: source ranks ascending, each rank's tokens reversed.
        src_rank = torch.repeat_interleave(torch.arange(ranks), recv_counts)
        order = torch.sort(src_rank * (1 << 40) - torch.arange(len(src_rank)), stable=True).indices
        got_x, got_ids, got_src = got_x[order], got_ids[order], got_src[order]
        got_sf = got_sf[order] if got_sf is not None else None
        got_w = got_w[order] if got_w is not None else None
        n = len(order)
        local = torch.where((got_ids >= 0) & (got_ids // per_rank == self.rank_idx), got_ids % per_rank, -1)
        counts = torch.bincount(local[local >= 0], minlength=per_rank)
        aligned = [_align(c, expert_alignment) for c in counts.tolist()]
        if cumulative_local_expert_recv_stats is not None:
            cumulative_local_expert_recv_stats += counts.int()
        worst_recv = ranks * num_max_tokens_per_rank
        worst_expanded = _align(worst_recv * min(num_topk, per_rank) + (expert_alignment - 1) * per_rank,
                                expert_alignment)
        recv_rows = n if do_cpu_sync else worst_recv
        metadata = torch.full((recv_rows, num_topk + 2), -2, dtype=torch.int32)
        metadata[:n, 0] = got_src
        if not do_expand:
            rows = recv_rows
            out_x = self._garbage((rows, hidden), data.dtype, n, got_x)
            out_sf = self._garbage((rows, got_sf.shape[1]), got_sf.dtype, n, got_sf) if got_sf is not None else None
            out_ids = self._garbage((rows, num_topk), torch.int64, n, local, per_rank)
            out_w = self._garbage((rows, num_topk), torch.float32, n, got_w) if got_w is not None else None
            psum_expert = torch.cumsum(torch.tensor(aligned, dtype=torch.int32), 0).int()
            unaligned = torch.full((per_rank,), -7, dtype=torch.int32)  # only written in expand mode
        else:
            starts = [0]
            for a in aligned[:-1]:
                starts.append(starts[-1] + a)
            rows = sum(aligned) if do_cpu_sync else worst_expanded
            out_x = torch.zeros(rows, hidden, dtype=data.dtype) if do_zero_padding else self._garbage(
                (rows, hidden), data.dtype, 0, None)
            out_sf = None if got_sf is None else torch.zeros(rows, got_sf.shape[1])
            out_w = (torch.zeros(rows) if do_zero_padding else self._garbage((rows,), torch.float32, 0, None)) \
                if got_w is not None else None
            fill = list(starts)
            for i in reversed(range(n)):  # arrival order inside an expert: reversed again
                for k in range(num_topk):
                    e = int(local[i, k])
                    if e < 0:
                        continue
                    slot = fill[e]
                    fill[e] += 1
                    out_x[slot] = got_x[i]
                    if out_sf is not None:
                        out_sf[slot] = got_sf[i]
                    if out_w is not None:
                        out_w[slot] = got_w[i, k]
                    metadata[i, 2 + k] = slot
            metadata[:n, 2:] = torch.where(local >= 0, metadata[:n, 2:], -1)
            out_ids = None
            psum_expert = torch.tensor([s + c for s, c in zip(starts, counts.tolist())], dtype=torch.int32)
            unaligned = counts.int()
        psum_rank = torch.cumsum(recv_counts, 0).int()
        new_handle = handle if cached else EPHandle(
            do_expand, num_experts, expert_alignment, num_max_tokens_per_rank, num_sms,
            topk_idx.clone() if do_handle_copy else topk_idx, recv_rows, rows if do_expand else sum(aligned),
            aligned if do_cpu_sync else [], psum_rank, psum_expert, unaligned, metadata,
            torch.zeros(tokens, num_topk, dtype=torch.int32), None, None)
        if not do_cpu_sync and not cached:
            new_handle.num_expanded_tokens = worst_expanded
        self.calls.append("dispatch.cached" if cached else f"dispatch.sync={do_cpu_sync}.expand={do_expand}")
        out = (out_x, out_sf) if out_sf is not None else out_x
        return out, out_ids, out_w, new_handle, EventOverlap()

    @staticmethod
    def _garbage(shape, dtype, valid: int, values, high: int = 0):
        """What torch::empty leaves: here NaN data and plausible-looking ids past the real rows."""
        if dtype == torch.int64:
            out = torch.randint(0, max(high, 1), shape, dtype=dtype)
        elif dtype == torch.float8_e4m3fn:
            out = torch.full(shape, float("nan")).to(dtype)
        else:
            out = torch.full(shape, float("nan"), dtype=dtype)
        if values is not None and valid:
            out[:valid] = values
        return out

    # combine ----------------------------------------------------------------------------------------------
    def combine(self, x, handle, topk_weights=None, bias=None, num_sms: int = 0, num_qps: int = 0,
                previous_event=None, previous_event_before_epilogue=None, async_with_compute_stream: bool = False,
                allocate_on_comm_stream: bool = False):
        assert x.dim() == 2 and x.dtype in self.activation_dtypes, f"combine takes bf16 [rows, hidden], got {x.dtype}"
        assert previous_event is None or allocate_on_comm_stream
        expected = handle.num_expanded_tokens if handle.do_expand else handle.num_recv_tokens
        assert x.shape[0] == expected, f"combine x has {x.shape[0]} rows, the dispatch delivered {expected}"
        if handle.do_expand and topk_weights is not None:
            assert self.allow_multiple_reduction, "expand-mode combine with weights needs allow_multiple_reduction"
        ranks, max_tokens = self.num_ranks, handle.num_max_tokens_per_rank
        n = int(handle.psum_num_recv_tokens_per_scaleup_rank[-1])
        src = handle.recv_src_metadata[:n, 0].long()
        if handle.do_expand:
            slots = handle.recv_src_metadata[:n, 2:].long()
            rows = torch.stack([x[slots[i][slots[i] >= 0]].float().sum(0) if bool((slots[i] >= 0).any())
                                else x.new_zeros(x.shape[1], dtype=torch.float32) for i in range(n)]) \
                if n else x.new_zeros(0, x.shape[1], dtype=torch.float32)
            rows = rows.to(x.dtype)
        else:
            rows = x[:n]
        dest = src // max_tokens
        order = torch.sort(dest, stable=True).indices
        sends = torch.bincount(dest, minlength=ranks)
        recv_counts = exchange_counts(sends, self.group)
        s, r = sends.tolist(), recv_counts.tolist()
        back = exchange(rows[order].contiguous(), s, r, self.group)
        back_token = exchange((src % max_tokens)[order], s, r, self.group)
        tokens = handle.topk_idx.shape[0]
        combined = x.new_zeros(tokens, x.shape[1]).index_add_(0, back_token, back)  # no weights
        if bias is not None:
            for b in (bias if isinstance(bias, tuple) else (bias,)):
                combined += b
        combined_w = None
        if topk_weights is not None and not handle.do_expand:
            per_rank = handle.num_experts // ranks
            w = topk_weights[:n].float()  # each rank sends back the weights of the experts it owns
            back_w = exchange(w[order].contiguous(), s, r, self.group)
            owner = torch.where(handle.topk_idx >= 0, handle.topk_idx // per_rank, -1)
            back_rank = torch.repeat_interleave(torch.arange(ranks), recv_counts)
            combined_w = torch.zeros(tokens, handle.topk_idx.shape[1])
            keep = owner[back_token] == back_rank[:, None]
            combined_w.index_add_(0, back_token, back_w * keep)
        self.calls.append("combine")
        return combined, combined_w, EventOverlap()
