"""Every rank's bytes on every rank, in one collective per exchange (the instances' per-iteration control
exchange; the messages themselves are moe_pd.serve.protocol's RankReport).

Over a gloo group (NCCL cannot carry host bytes): each rank's payload goes into a fixed-size byte buffer with
its length in front, and the buffers are all-gathered. A payload larger than the buffer costs a second
round sized for the largest, after which every rank grows its buffer the same way (all see the same
lengths). torch's all_gather_object takes two collectives every time (the sizes, then the data).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_LEN_BYTES = 8  # the int64 payload length in front of each exchanged buffer


class ControlPlane:
    def __init__(self, world_size: int, backend: str, capacity: int = 16384) -> None:
        self.world_size = world_size
        self.group = None
        self.capacity = capacity
        """Payload bytes that fit the one-collective exchange; grows to a power of two when exceeded."""
        if world_size > 1:
            self.group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
            self._resize(capacity)

    def _resize(self, capacity: int) -> None:
        self.capacity = capacity
        self._send = torch.zeros(_LEN_BYTES + capacity, dtype=torch.uint8)
        self._recv = [torch.empty_like(self._send) for _ in range(self.world_size)]

    def exchange(self, data: bytes) -> list[bytes]:
        """Every rank's bytes, in rank order, on every rank."""
        if self.world_size == 1:
            return [data]
        sizes = self._all_gather(data)
        if max(sizes) > self.capacity:  # the same decision on every rank: all saw the same sizes
            self._resize(1 << (max(sizes) - 1).bit_length())
            self._all_gather(data)
        return [buf[_LEN_BYTES:_LEN_BYTES + n].numpy().tobytes() for buf, n in zip(self._recv, sizes)]

    def _all_gather(self, data: bytes) -> list[int]:
        """Sends the length and, when it fits, the payload; returns every rank's length."""
        self._send[:_LEN_BYTES] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
        if 0 < len(data) <= self.capacity:
            self._send[_LEN_BYTES:_LEN_BYTES + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        dist.all_gather(self._recv, self._send, group=self.group)
        return [int(buf[:_LEN_BYTES].view(torch.int64)) for buf in self._recv]
