"""Which bytes move when a request's KV goes from one paged pool to another.

A pool is one tensor [L, P, S, W] (kvcache/paged.py): in each layer, page p holds S token rows of W values,
so a token's row, a page and a layer's pages are each contiguous. Token i of a request sits in page
pages[i // S] at row i % S. A prefill and a decode pool may differ in page size S and page count P (and
live on different devices); they must agree on L, W and the dtype.

`row_runs` cuts a request's tokens into runs contiguous in both pools (no run crosses a page boundary of
either side, then neighbours that stay contiguous on both sides are merged) and `descriptors` turns the
runs into (address, bytes, device) rows for every layer: the page-granular descriptor list one NIXL
request moves. Only the request's `num_tokens` rows move, so a larger source page never spills past the
destination's reserved pages.

Legend: N runs, L layers.
"""

from __future__ import annotations

import msgspec
import numpy as np
import torch


class PoolLayout(msgspec.Struct, frozen=True):
    """Where a rank's KV pool lives and how it is cut: what a peer needs to address its pages."""

    base_ptr: int
    num_layers: int
    num_pages: int
    block_size: int
    row_bytes: int
    """Bytes of one token's row in one layer ((C + R) x element size)."""
    dtype: str
    mem_type: str
    """NIXL's name for the memory: "DRAM" (host) or "VRAM" (GPU)."""
    device_id: int
    """The CUDA device ordinal for VRAM, 0 for DRAM."""

    @property
    def page_bytes(self) -> int:
        return self.block_size * self.row_bytes

    @property
    def layer_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @staticmethod
    def of(kv_LPSW: torch.Tensor) -> "PoolLayout":
        if kv_LPSW.dim() != 4 or not kv_LPSW.is_contiguous():
            raise ValueError(f"a KV pool is one contiguous [L, P, S, W] tensor, got {tuple(kv_LPSW.shape)} "
                             f"(contiguous={kv_LPSW.is_contiguous()})")
        layers, pages, block, width = kv_LPSW.shape
        on_gpu = kv_LPSW.device.type == "cuda"
        return PoolLayout(kv_LPSW.data_ptr(), layers, pages, block, width * kv_LPSW.element_size(),
                          str(kv_LPSW.dtype).removeprefix("torch."), "VRAM" if on_gpu else "DRAM",
                          kv_LPSW.get_device() if on_gpu else 0)

    def mismatch(self, other: "PoolLayout") -> str:
        """Why KV cannot move between the two pools ('' when it can: only page size and count may differ)."""
        for name in ("num_layers", "row_bytes", "dtype"):
            if getattr(self, name) != getattr(other, name):
                return f"{name} differs: {getattr(self, name)} here, {getattr(other, name)} at the peer"
        return ""


def _check_pages(pages: np.ndarray, block: int, num_tokens: int, what: str, num_pages: int | None) -> None:
    needed = -(-num_tokens // block)
    if len(pages) < needed:
        raise ValueError(f"{what} pages hold {len(pages) * block} tokens, {num_tokens} needed")
    used = pages[:needed]
    if used.min() < 0 or (num_pages is not None and used.max() >= num_pages):
        raise ValueError(f"{what} page ids must lie in [0, {num_pages}): got {used.min()}..{used.max()}")
    if np.unique(used).size != used.size:
        raise ValueError(f"{what} pages repeat: {used.tolist()}")


def row_runs(src_pages, src_block: int, dst_pages, dst_block: int, num_tokens: int,
             src_num_pages: int | None = None, dst_num_pages: int | None = None) -> np.ndarray:
    """[N, 3] int64 runs (source row, destination row, rows) moving a request's first `num_tokens` tokens;
    a row is page * block_size + offset within one layer. Raises ValueError on pages that are too few,
    repeated or (given the page counts) out of the pool."""
    if num_tokens <= 0:
        return np.zeros((0, 3), dtype=np.int64)
    src = np.asarray(src_pages, dtype=np.int64)
    dst = np.asarray(dst_pages, dtype=np.int64)
    cuts_N = np.union1d(np.arange(0, num_tokens, src_block), np.arange(0, num_tokens, dst_block))
    lengths_N = np.diff(np.append(cuts_N, num_tokens))
    _check_pages(src, src_block, num_tokens, "source", src_num_pages)
    _check_pages(dst, dst_block, num_tokens, "destination", dst_num_pages)
    src_N = src[cuts_N // src_block] * src_block + cuts_N % src_block
    dst_N = dst[cuts_N // dst_block] * dst_block + cuts_N % dst_block
    follows = (src_N[1:] == src_N[:-1] + lengths_N[:-1]) & (dst_N[1:] == dst_N[:-1] + lengths_N[:-1])
    starts = np.flatnonzero(np.concatenate(([True], ~follows)))
    return np.stack((src_N[starts], dst_N[starts], np.add.reduceat(lengths_N, starts)), axis=1)


def descriptors(layout: PoolLayout, rows_N: np.ndarray, lengths_N: np.ndarray) -> np.ndarray:
    """[L * N, 3] uint64 (address, bytes, device) for the runs in every layer, layer-major."""
    layer_L = np.arange(layout.num_layers, dtype=np.uint64)[:, None] * np.uint64(layout.layer_bytes)
    addr_LN = np.uint64(layout.base_ptr) + layer_L + rows_N.astype(np.uint64)[None, :] * np.uint64(layout.row_bytes)
    size_LN = np.broadcast_to(lengths_N.astype(np.uint64)[None, :] * np.uint64(layout.row_bytes), addr_LN.shape)
    device_LN = np.full(addr_LN.shape, layout.device_id, dtype=np.uint64)
    return np.stack((addr_LN.ravel(), size_LN.ravel(), device_LN.ravel()), axis=1)
