"""A conformance double of the nvshmem4py 0.4 (`nvshmem.core`) and cuda-core (`cuda.core`) calls that
moe_pd's nvshmem backend makes, for one PE on CPU memory. Installed into sys.modules by `install`.

It follows nvshmem4py 0.4.1's Python sources (nvshmem/core/{init_fini,interop/torch,rma,collective,
nvshmem_types}.py): the same names, signatures and defaults, and the behaviour that shapes a caller:
- `tensor(shape, dtype=...)` allocates on the symmetric heap; there is no `empty`;
- `put(dst, src, remote_pe=-1, stream=None)` resolves a torch tensor to its *whole* allocation by data
  pointer (a slice at an offset is "not tracked by nvshmem"; a slice at offset 0 moves the whole
  allocation's bytes), takes cuda-core `Buffer`s as they are, copies min(src.size, dst.size) bytes, and
  has no stream-less form; the destination must lie on the symmetric heap;
- `barrier(team, stream=None)` needs a stream; streams are read through `__cuda_stream__()`;
- `init` needs `initializer_method` in ("mpi", "uid", "emulated_mpi"); calls before `init` fail.
"""

from __future__ import annotations

import ctypes
import enum
import sys
import types

import torch


class NvshmemInvalid(Exception):
    pass


class Buffer:
    """cuda.core.Buffer: a device pointer and a size."""

    def __init__(self, ptr: int, size: int) -> None:
        self.handle, self.size = ptr, size

    @staticmethod
    def from_handle(ptr, size: int, mr=None, owner=None, *, stream=None) -> "Buffer":
        return Buffer(int(ptr), int(size))


class Device:
    def __init__(self, device_id=None) -> None:
        self.device_id = device_id

    def set_current(self) -> None:
        pass


class Teams(enum.IntEnum):
    TEAM_INVALID = -1
    TEAM_WORLD = 0


class NvshmemStream:
    def __init__(self, pt_stream) -> None:
        self.pt_stream, self.handle = pt_stream, pt_stream.cuda_stream

    def __cuda_stream__(self):
        return (0, self.pt_stream.cuda_stream)


class _State:
    def __init__(self) -> None:
        self.initialized = False
        self.heap: dict[int, torch.Tensor] = {}  # data pointer -> allocation
        self.puts = 0


STATE = _State()


def get_unique_id(empty=False):
    return b"" if empty else b"uid"


def init(device: Device = None, uid=None, rank: int = None, nranks: int = None, mpi_comm=None,
         initializer_method: str = "") -> None:
    if initializer_method not in ("mpi", "uid", "emulated_mpi"):
        raise NvshmemInvalid("Invalid init method requested")
    if initializer_method == "uid" and (uid is None or rank is None or nranks is None):
        raise NvshmemInvalid("uid init needs uid, rank and nranks")
    assert nranks == 1 and rank == 0, "the double runs one PE"
    STATE.initialized = True


def _ready() -> None:
    if not STATE.initialized:
        raise NvshmemInvalid("NVSHMEM Library is not initialized")


def my_pe() -> int:
    _ready()
    return 0


def n_pes() -> int:
    _ready()
    return 1


def tensor(shape, dtype: torch.dtype = torch.float32, release=False, morder="C", except_on_del=True) -> torch.Tensor:
    _ready()
    out = torch.zeros(shape, dtype=dtype)
    STATE.heap[out.data_ptr()] = out
    return out


def free_tensor(tensor: torch.Tensor) -> None:
    if STATE.heap.pop(tensor.data_ptr(), None) is None:
        raise NvshmemInvalid("Tried to free a tensor not tracked by nvshmem")


def _buffer(obj) -> Buffer:
    if isinstance(obj, Buffer):
        return obj
    if isinstance(obj, torch.Tensor):
        whole = STATE.heap.get(obj.data_ptr())
        if whole is None:
            raise NvshmemInvalid("Tried to retrieve buffer from Tensor not tracked by nvshmem")
        return Buffer(whole.data_ptr(), whole.numel() * whole.element_size())
    raise NvshmemInvalid("Invalid memory objects passed to NVSHMEM operation")


def _on_heap(buf: Buffer) -> bool:
    return any(t.data_ptr() <= buf.handle and buf.handle + buf.size <= t.data_ptr() + t.numel() * t.element_size()
               for t in STATE.heap.values())


def put(dst, src, remote_pe: int = -1, stream=None) -> None:
    _ready()
    dst_buf, src_buf = _buffer(dst), _buffer(src)
    if stream is None:
        raise NotImplementedError("Non on-stream put/get operations are not yet implemented")
    stream.__cuda_stream__()
    if remote_pe != 0:
        raise NvshmemInvalid(f"PE {remote_pe} does not exist (one PE)")
    if not _on_heap(dst_buf):
        raise NvshmemInvalid("put destination is not on the symmetric heap")
    ctypes.memmove(dst_buf.handle, src_buf.handle, min(src_buf.size, dst_buf.size))
    STATE.puts += 1


def barrier(team, stream=None) -> None:
    _ready()
    if stream is None:
        raise NvshmemInvalid("Stream may not be None for barrier")
    stream.__cuda_stream__()
    assert team == Teams.TEAM_WORLD


def finalize() -> None:
    _ready()
    STATE.initialized = False


def install(monkeypatch) -> None:
    """Puts this double in place of nvshmem.core and cuda.core for one test."""
    core = types.ModuleType("nvshmem.core")
    for name in ("get_unique_id", "init", "my_pe", "n_pes", "tensor", "free_tensor", "put", "barrier", "finalize",
                 "Teams", "NvshmemStream", "NvshmemInvalid"):
        setattr(core, name, getattr(sys.modules[__name__], name))
    nvshmem = types.ModuleType("nvshmem")
    nvshmem.core = core
    cuda_core = types.ModuleType("cuda.core")
    cuda_core.Buffer, cuda_core.Device = Buffer, Device
    cuda = types.ModuleType("cuda")
    cuda.core = cuda_core
    for name, module in (("nvshmem", nvshmem), ("nvshmem.core", core), ("cuda", cuda), ("cuda.core", cuda_core)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(STATE, "heap", {})
    monkeypatch.setattr(STATE, "initialized", False)
