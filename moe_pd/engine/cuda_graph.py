"""Decode steps as CUDA graphs, one per batch-size bucket (EP = 1, one GPU).

    runner = DecodeGraphRunner(model, cache, max_batch_size=128, max_pages=64, scratch_page=cache.num_blocks - 1)
    runner.capture()                                   # CUDA: largest bucket first, one memory pool
    hidden_BD = runner.run(ids_B, batch)               # a decode step of B <= 128 sequences

A step copies its tokens and metadata into static buffers at the smallest bucket that fits, marks the
other slots as padding, and replays that bucket's graph. Padding slots read token 0, write their latent
into a scratch page the block manager never hands out, have length 0 (the decode kernel reads nothing for
them) and take no expert row (MaskedLocalDispatcher skips them), so real sequences never see them. Inside the graph the
MoE runs on the masked layout (no host synchronisation) and attention in the paged-cache decode kernel,
so the model needs the Triton ops (runtime.kernels). Without CUDA (or with capture=False) `run` executes
the same static-buffer forward eagerly: that is how the CPU tests check it, under Triton's interpreter.

With `queries` = Q > 1 a runner holds speculative verification steps instead (K = Q - 1 drafts: Q tokens
per sequence, AttentionBatch.verify, the decode kernel with Q queries); a padding sequence's Q tokens all
write the scratch page's first row and attend to nothing.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from moe_pd.kvcache.paged import AttentionBatch, PagedLatentCache
from moe_pd.model.moe import MoE
from moe_pd.model.transformer import DeepseekForCausalLM
from moe_pd.parallel.dispatch.masked import MaskedLocalDispatcher

log = logging.getLogger(__name__)


def default_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16 up to max_batch_size (as vLLM and SGLang bucket)."""
    small = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    return small + list(range(16, max_batch_size, 16)) + [max_batch_size]


class DecodeGraphRunner:
    def __init__(self, model: DeepseekForCausalLM, cache: PagedLatentCache, max_batch_size: int, max_pages: int,
                 scratch_page: int, buckets: list[int] | None = None, queries: int = 1) -> None:
        if model.ops is None or not model.ops.has_mla_decode:
            raise ValueError("decode graphs need the Triton ops (runtime.kernels=triton or auto on CUDA)")
        self.model, self.cache, self.scratch_page, self.queries = model, cache, scratch_page, queries
        self.buckets = sorted(set(buckets or default_buckets(max_batch_size)))
        device = cache.kv_LPSW.device
        size, rows = self.buckets[-1], self.buckets[-1] * queries
        as_long = lambda *shape: torch.zeros(*shape, dtype=torch.int64, device=device)  # noqa: E731
        # per token (B x Q rows): ids, positions, slots, valid; per sequence: tables, lengths, query lens, starts
        self.ids_B, self.positions_B, self.slots_B = as_long(rows), as_long(rows), as_long(rows)
        self.tables_BM, self.seq_lens_B = as_long(size, max_pages), as_long(size)
        self.ones_B = torch.full_like(self.seq_lens_B, queries)
        self.starts_B = torch.arange(size, device=device) * queries
        self.valid_B = torch.zeros(rows, dtype=torch.bool, device=device)
        self.dispatcher = MaskedLocalDispatcher(model.cfg.n_routed_experts, rows, self.valid_B)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def max_batch_size(self) -> int:
        return self.buckets[-1]

    def can_run(self, batch: AttentionBatch) -> bool:
        kind = batch.is_decode if self.queries == 1 else batch.verify and batch.max_query_len == self.queries
        return (kind and batch.num_seqs <= self.max_batch_size
                and batch.block_tables_BM.shape[1] <= self.tables_BM.shape[1])

    @contextlib.contextmanager
    def _masked_moe(self):
        layers = [layer.mlp for layer in self.model.model.layers if isinstance(layer.mlp, MoE)]
        saved = [moe.dispatcher for moe in layers]
        for moe in layers:
            moe.dispatcher = self.dispatcher
        try:
            yield
        finally:
            for moe, dispatcher in zip(layers, saved):
                moe.dispatcher = dispatcher

    def _forward(self, n: int) -> torch.Tensor:
        q, t = self.queries, n * self.queries
        batch = AttentionBatch(self.positions_B[:t], self.slots_B[:t], self.tables_BM[:n], self.seq_lens_B[:n],
                               self.ones_B[:n], self.starts_B[:n], max_seq_len=0, max_query_len=q,
                               block_size=self.cache.block_size, verify=q > 1)
        self.dispatcher.capacity = t
        with self._masked_moe(), torch.inference_mode():
            return self.model(self.ids_B[:t], batch, self.cache)

    def capture(self) -> None:
        """Warms every bucket up (Triton compiles and autotunes outside the graphs), then captures them
        largest first into one memory pool."""
        if not torch.cuda.is_available() or self.cache.kv_LPSW.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the model and cache on a CUDA device")
        t0 = time.perf_counter()
        self._pad(0, self.max_batch_size)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for n in reversed(self.buckets):
                self._forward(n)
        torch.cuda.current_stream().wait_stream(stream)
        pool = torch.cuda.graph_pool_handle()
        for n in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[n] = self._forward(n)
            self.graphs[n] = graph
        torch.cuda.synchronize()
        log.info("captured %d %s graphs (batch %s) in %.1f s", len(self.graphs),
                 "decode" if self.queries == 1 else f"verification ({self.queries} queries)", self.buckets,
                 time.perf_counter() - t0)

    def _pad(self, start: int, end: int) -> None:
        """Slots [start, end) become padding: token 0, written to the scratch page's first row, attending to
        nothing (length 0: the decode kernel skips it) and routed to no expert."""
        if start >= end:
            return
        rows = slice(start * self.queries, end * self.queries)
        self.ids_B[rows] = 0
        self.positions_B[rows] = 0
        self.slots_B[rows] = self.scratch_page * self.cache.block_size
        self.tables_BM[start:end] = self.scratch_page
        self.seq_lens_B[start:end] = 0
        self.valid_B[rows] = False

    def run(self, ids_B: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """Hidden states [B x Q, D] of a decode (or verification) step (replayed when captured, else run
        eagerly)."""
        if not self.can_run(batch):
            raise ValueError(f"not a decode step this runner takes ({batch.num_seqs} sequences, "
                             f"{batch.block_tables_BM.shape[1]} pages wide)")
        n = batch.num_seqs
        t = n * self.queries
        bucket = next(b for b in self.buckets if b >= n)
        width = batch.block_tables_BM.shape[1]
        self.ids_B[:t] = ids_B
        self.positions_B[:t] = batch.positions_T
        self.slots_B[:t] = batch.slot_mapping_T
        self.tables_BM[:n, :width] = batch.block_tables_BM
        self.seq_lens_B[:n] = batch.seq_lens_B
        self.valid_B[:t] = True
        self._pad(n, bucket)
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            return self.outputs[bucket][:t]
        return self._forward(bucket)[:t]
