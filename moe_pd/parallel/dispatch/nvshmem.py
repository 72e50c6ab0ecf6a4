"""EP dispatch with one-sided puts into NVSHMEM symmetric buffers (nvshmem4py), GPU only.

Legend: T tokens, D hidden, K top-k, R ranks (PEs), C capacity rows per source rank, S sent rows.

Every PE owns symmetric receive buffers with one region of C rows per source rank. Dispatch puts each
token once into the region of every rank that holds one of its experts (with its local slot ids and
weights, permute.py), then a barrier makes the puts visible; combine puts the expert-side partial sums
back into the sender's regions. Counts travel first through a small symmetric buffer. The start halves
issue puts on the compute stream; the wait halves run the barrier, so compute placed between them
overlaps with the transfers. It runs with a single PE (puts to itself), which is how it is checked on
one GPU (tests/gpu). nvshmem4py is imported only when this backend is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_pd.config.errors import ConfigError
from moe_pd.parallel.dispatch import permute
from moe_pd.parallel.dispatch.base import Dispatcher, DispatchResult
from moe_pd.parallel.flight_recorder import FlightRecorder
from moe_pd.parallel.placement import ExpertPlacement
from moe_pd.parallel.state import ParallelState


class _Shmem:
    """Every nvshmem4py call this backend makes, behind one seam, with nvshmem4py 0.4's names
    (nvshmem.core: get_unique_id, init, my_pe, n_pes, tensor, free_tensor, put, barrier, Teams,
    NvshmemStream, finalize) and cuda-core's `Device` and `Buffer` (nvshmem4py 0.4 imports `cuda.core`;
    cuda-core >= 0.5 has no `cuda.core.experimental`). tests/helpers/nvshmem_double.py mirrors them.

    nvshmem4py resolves a torch tensor to its whole symmetric allocation (by data pointer), so a slice
    cannot be put directly; puts go through cuda-core `Buffer` views of exactly the rows to move, from a
    symmetric send buffer (a symmetric or registered source is what RDMA transports need)."""

    def __init__(self, state: ParallelState) -> None:
        try:
            import nvshmem.core as nvshmem
            from cuda.core import Buffer, Device
        except ImportError as exc:
            raise ConfigError(f"parallel.dispatcher='nvshmem' needs nvshmem4py-cu13 >= 0.4 with cuda-core "
                              f">= 0.5 (pip install 'moe-pd[gpu]'): {exc}") from None
        if state.device.type != "cuda":
            raise ConfigError("parallel.dispatcher='nvshmem' needs runtime.device=cuda")
        self.nv, self.buffer_cls = nvshmem, Buffer
        self.device = Device(state.device.index or 0)
        self.device.set_current()
        uid = [nvshmem.get_unique_id(empty=state.rank != 0)]
        if state.world_size > 1:
            dist.broadcast_object_list(uid, src=0, group=state.group)
        nvshmem.init(device=self.device, uid=uid[0], rank=state.rank, nranks=state.world_size,
                     initializer_method="uid")
        self.my_pe, self.n_pes = nvshmem.my_pe(), nvshmem.n_pes()
        self._tensors: list[torch.Tensor] = []

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor on the symmetric heap (same address offset on every PE)."""
        tensor = self.nv.tensor(shape, dtype=dtype)
        self._tensors.append(tensor)
        return tensor

    def _view(self, rows: torch.Tensor):
        assert rows.is_contiguous()
        return self.buffer_cls.from_handle(rows.data_ptr(), rows.numel() * rows.element_size())

    def _stream(self):
        return self.nv.NvshmemStream(torch.cuda.current_stream())

    def put(self, dst: torch.Tensor, src: torch.Tensor, pe: int) -> None:
        """Copies `src` (rows of a symmetric tensor) into `dst` (the same-sized rows of a symmetric tensor)
        on PE `pe`, ordered on the current stream."""
        if src.numel():
            self.nv.put(self._view(dst), self._view(src), remote_pe=pe, stream=self._stream())

    def barrier(self) -> None:
        """Every PE's puts issued so far are complete and visible."""
        self.nv.barrier(self.nv.Teams.TEAM_WORLD, stream=self._stream())

    def close(self) -> None:
        for tensor in self._tensors:
            self.nv.free_tensor(tensor)
        self._tensors.clear()
        self.nv.finalize()


@dataclass
class NvshmemHandle:
    expansion: permute.Expansion
    send_token_S: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    num_tokens: int


class NvshmemDispatcher(Dispatcher):
    def __init__(self, state: ParallelState, hidden_size: int, placement: ExpertPlacement,
                 recorder: FlightRecorder | None = None, top_k: int = 8, capacity: int = 4096,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        self.state, self.placement, self.recorder = state, placement, recorder
        self.routing_salt = state.rank
        self.num_local_experts = state.experts_per_rank
        self.capacity, self.top_k = capacity, top_k
        self.shmem = _Shmem(state)
        ranks = state.world_size
        self.counts_R = self.shmem.empty((ranks,), torch.int64)
        self.recv_x = self.shmem.empty((ranks * capacity, hidden_size), dtype)
        self.recv_meta = self.shmem.empty((ranks * capacity, 2 * top_k), torch.float32)
        self.back_x = self.shmem.empty((ranks * capacity, hidden_size), dtype)
        # What this PE puts comes from here (a put's source lives on the symmetric heap too).
        self.send_counts_R = self.shmem.empty((ranks,), torch.int64)
        self.send_x = self.shmem.empty((ranks * capacity, hidden_size), dtype)
        self.send_meta = self.shmem.empty((ranks * capacity, 2 * top_k), torch.float32)

    def _region(self, buffer: torch.Tensor, source: int, rows: int) -> torch.Tensor:
        return buffer[source * self.capacity : source * self.capacity + rows]

    def dispatch_start(self, x_TD, topk_ids_TK, topk_weights_TK, layer: int = -1):
        ranks, me = self.state.world_size, self.state.rank
        if x_TD.shape[0] > self.capacity:
            raise RuntimeError(f"{x_TD.shape[0]} tokens exceed the nvshmem buffer capacity {self.capacity}")
        phys_TK = self.to_physical(topk_ids_TK, layer)
        send_token_S, send_rank_S, local_ids_SK = permute.token_rank_layout(phys_TK, self.num_local_experts, ranks)
        send_counts_R = torch.bincount(send_rank_S, minlength=ranks)
        meta_SK2 = permute.row_metadata(local_ids_SK, topk_weights_TK[send_token_S])
        sent = len(send_token_S)
        self.send_x[:sent] = x_TD[send_token_S]
        self.send_meta[:sent] = meta_SK2
        self.send_counts_R.copy_(send_counts_R)
        for r, start, count in zip(range(ranks), (torch.cumsum(send_counts_R, 0) - send_counts_R).tolist(),
                                   send_counts_R.tolist()):
            self.shmem.put(self.counts_R[me : me + 1], self.send_counts_R[r : r + 1], r)
            self.shmem.put(self._region(self.recv_x, me, count), self.send_x[start : start + count], r)
            self.shmem.put(self._region(self.recv_meta, me, count), self.send_meta[start : start + count], r)
        return send_token_S, send_counts_R.tolist(), x_TD.shape[0], x_TD.dtype

    def dispatch_wait(self, pending) -> DispatchResult:
        send_token_S, send_counts, num_tokens, dtype = pending
        self.shmem.barrier()
        recv_counts = self.counts_R.tolist()
        rows = torch.cat([self._region(self.recv_x, r, n) for r, n in enumerate(recv_counts)]).to(dtype)
        meta = torch.cat([self._region(self.recv_meta, r, n) for r, n in enumerate(recv_counts)])
        x_MD, expansion = permute.expand(rows, *permute.split_row_metadata(meta), self.num_local_experts)
        return DispatchResult(x_MD, expansion.counts_E,
                              NvshmemHandle(expansion, send_token_S, send_counts, recv_counts, num_tokens))

    def combine_start(self, y_MD, handle: NvshmemHandle):
        partial_ND = permute.reduce(y_MD, handle.expansion)
        self.send_x[: partial_ND.shape[0]] = partial_ND
        start = 0
        for r, count in enumerate(handle.recv_counts):
            self.shmem.put(self._region(self.back_x, self.state.rank, count), self.send_x[start : start + count], r)
            start += count
        return handle, y_MD.dtype

    def combine_wait(self, pending) -> torch.Tensor:
        handle, dtype = pending
        self.shmem.barrier()
        back = torch.cat([self._region(self.back_x, r, n) for r, n in enumerate(handle.send_counts)]).to(dtype)
        out = back.new_zeros(handle.num_tokens, back.shape[1])
        return out.index_add_(0, handle.send_token_S, back)

    def close(self) -> None:
        self.shmem.close()
