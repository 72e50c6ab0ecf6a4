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
    """The few nvshmem4py calls used here, behind one seam (names differ between nvshmem4py releases)."""

    def __init__(self, state: ParallelState) -> None:
        try:
            import nvshmem.core as nvshmem
            from cuda.core.experimental import Device
        except ImportError as exc:
            raise ConfigError(f"parallel.dispatcher='nvshmem' needs nvshmem4py-cu13 (pip install "
                              f"'moe-pd[gpu]'): {exc}") from None
        if state.device.type != "cuda":
            raise ConfigError("parallel.dispatcher='nvshmem' needs runtime.device=cuda")
        self.nv = nvshmem
        self.device = Device(state.device.index or 0)
        self.device.set_current()
        uid = [nvshmem.get_unique_id() if state.rank == 0 else nvshmem.get_unique_id(empty=True)]
        if state.world_size > 1:
            dist.broadcast_object_list(uid, src=0, group=state.group)
        nvshmem.init(device=self.device, uid=uid[0], rank=state.rank, nranks=state.world_size,
                     initializer_method="uid")
        self.my_pe, self.n_pes = nvshmem.my_pe(), nvshmem.n_pes()
        interop = getattr(nvshmem, "interop", None)
        self._torch = getattr(interop, "torch", None) if interop else None
        if self._torch is None:
            import nvshmem.core.interop.torch as torch_interop

            self._torch = torch_interop
        self._buffers: list[torch.Tensor] = []

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        tensor = self._torch.empty(shape, dtype=dtype)
        self._buffers.append(tensor)
        return tensor

    def stream(self):
        return self.device.create_stream(torch.cuda.current_stream())

    def put(self, dst: torch.Tensor, src: torch.Tensor, pe: int) -> None:
        if src.numel():
            self.nv.put(dst, src.contiguous(), remote_pe=pe, stream=self.stream())

    def barrier(self) -> None:
        self.nv.barrier(self.nv.Teams.TEAM_WORLD, stream=self.stream())

    def close(self) -> None:
        for tensor in self._buffers:
            self._torch.free_tensor(tensor)
        self._buffers.clear()
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
        payload = x_TD[send_token_S].to(self.recv_x.dtype)
        for r, start, count in zip(range(ranks), (torch.cumsum(send_counts_R, 0) - send_counts_R).tolist(),
                                   send_counts_R.tolist()):
            self.shmem.put(self.counts_R[me : me + 1], send_counts_R[r : r + 1], r)
            self.shmem.put(self._region(self.recv_x, me, count), payload[start : start + count], r)
            self.shmem.put(self._region(self.recv_meta, me, count), meta_SK2[start : start + count], r)
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
        partial_ND = permute.reduce(y_MD, handle.expansion).to(self.back_x.dtype)
        start = 0
        for r, count in enumerate(handle.recv_counts):
            self.shmem.put(self._region(self.back_x, self.state.rank, count), partial_ND[start : start + count], r)
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
