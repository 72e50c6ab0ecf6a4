"""Paged MLA latent cache and the per-step batch metadata that addresses it.

Legend: L layers, P pages (blocks), S tokens per page, C kv_lora_rank, R qk_rope_head_dim,
B sequences in the batch, M max pages per sequence, T tokens in the step.

Per token and layer the cache holds only what MLA needs to rebuild keys and values: the normalised
latent (C) and the rotated rope key (R), stored side by side as one row of C + R (FlashMLA's layout).
A sequence's token i lives in page block_table[i // S] at offset i % S.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionBatch:
    """Where this step's tokens sit: built on the host once per step, shared by every layer."""

    positions_T: torch.Tensor
    """int64 position of each token in its sequence."""
    slot_mapping_T: torch.Tensor
    """int64 cache row (page * S + offset) each token's latent is written to."""
    block_tables_BM: torch.Tensor
    """int64 pages of each sequence, padded with 0 (masked by seq_lens)."""
    seq_lens_B: torch.Tensor
    """int64 tokens in the cache per sequence after this step."""
    query_lens_B: torch.Tensor
    """int64 new tokens per sequence in this step (1 for decode)."""
    query_starts_B: torch.Tensor
    """int64 row of each sequence's first new token in the step's T rows."""
    max_seq_len: int
    max_query_len: int
    host_tables: list[list[int]] = field(default_factory=list)
    """The same metadata as plain lists (block tables, cached tokens before the step, new tokens), so a
    step can be re-cut into micro-batches without reading device tensors back."""
    host_context_lens: list[int] = field(default_factory=list)
    host_query_lens: list[int] = field(default_factory=list)
    block_size: int = 0
    memo: dict = field(default_factory=dict, repr=False, compare=False)
    """Per-step values every layer shares (the gathered cache slots, rope angles), filled by the first
    layer that needs them (`cached`)."""

    def cached(self, key: str, make):
        value = self.memo.get(key)
        if value is None:
            value = self.memo[key] = make()
        return value
    verify: bool = False
    """A speculative verification step: every sequence decodes the same number of new tokens (its last token
    and its drafts), attended like decode (the absorbed form, the paged decode kernel)."""

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens_B.shape[0])

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1

    @property
    def decodes(self) -> bool:
        """Attended as decode: one new token per sequence, or a verification step's several."""
        return self.is_decode or self.verify

    @staticmethod
    def build(
        block_tables: Sequence[Sequence[int]],
        context_lens: Sequence[int],
        query_lens: Sequence[int],
        block_size: int,
        device: torch.device | str = "cpu",
        verify: bool = False,
    ) -> "AttentionBatch":
        """For sequences that already hold `context_lens` tokens and add `query_lens` new ones. Positions
        and cache slots are computed with tensor ops on the host (one pass, no per-token Python loop),
        then copied to `device`. `verify`: a speculative verification step (equal query lens)."""
        if verify and len(set(query_lens)) > 1:
            raise ValueError(f"a verification step decodes the same number of tokens per sequence, got {query_lens}")
        width = max((len(t) for t in block_tables), default=0)
        seq_lens = [c + n for c, n in zip(context_lens, query_lens, strict=True)]
        for table, total in zip(block_tables, seq_lens, strict=True):
            needed = -(-total // block_size)
            if len(table) < needed:
                raise ValueError(f"block table holds {len(table)} pages, {total} tokens need {needed}")
        tables = [list(t) + [0] * (width - len(t)) for t in block_tables]
        tables_BM = torch.tensor(tables, dtype=torch.int64).reshape(len(tables), width)
        if all(n == 1 for n in query_lens):  # decode: one token per sequence, plain lists cost less
            positions_T = list(context_lens)
            slots_T = [t[p // block_size] * block_size + p % block_size for t, p in zip(tables, positions_T)]
            query_B, starts_B = list(query_lens), list(range(len(tables)))
        else:
            query_B = torch.tensor(list(query_lens), dtype=torch.int64)
            starts_B = torch.cumsum(query_B, 0) - query_B
            seq_T = torch.repeat_interleave(torch.arange(len(tables)), query_B)
            positions_T = torch.tensor(list(context_lens), dtype=torch.int64)[seq_T] + torch.arange(seq_T.numel()) \
                - starts_B[seq_T]
            slots_T = tables_BM[seq_T, positions_T // block_size] * block_size + positions_T % block_size
        as_long = lambda v: torch.as_tensor(v, dtype=torch.int64).to(device)  # noqa: E731
        return AttentionBatch(
            positions_T=as_long(positions_T),
            slot_mapping_T=as_long(slots_T),
            block_tables_BM=as_long(tables_BM),
            seq_lens_B=as_long(seq_lens),
            query_lens_B=as_long(query_B),
            query_starts_B=as_long(starts_B),
            max_seq_len=max(seq_lens, default=0),
            max_query_len=max(query_lens, default=0),
            host_tables=[list(t) for t in block_tables],
            host_context_lens=list(context_lens),
            host_query_lens=list(query_lens),
            block_size=block_size,
            verify=verify,
        )


class PagedLatentCache:
    """One tensor [L, P, S, C + R]; layers index it, attention reads it through block tables."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.block_size = block_size
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.kv_LPSW = torch.zeros(num_layers, num_blocks, block_size, kv_lora_rank + rope_dim,
                                   dtype=dtype, device=device)

    @property
    def num_blocks(self) -> int:
        return self.kv_LPSW.shape[1]

    def layer(self, layer_idx: int) -> torch.Tensor:
        return self.kv_LPSW[layer_idx]

    def bytes_per_token(self) -> int:
        return self.kv_LPSW.shape[0] * self.kv_LPSW.shape[-1] * self.kv_LPSW.element_size()


def write_latent(cache_PSW: torch.Tensor, slot_mapping_T: torch.Tensor, latent_TC: torch.Tensor,
                 k_rope_TR: torch.Tensor) -> None:
    rows = cache_PSW.view(-1, cache_PSW.shape[-1])
    rows[slot_mapping_T] = torch.cat((latent_TC, k_rope_TR), dim=-1).to(rows.dtype)


def gather_latent(cache_PSW: torch.Tensor, batch: AttentionBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's cached rows padded to max_seq_len: (kv [B, Lmax, C + R], valid [B, Lmax])."""
    slot_BL, valid_BL = batch.cached("latent_slots", lambda: _latent_slots(batch, cache_PSW.shape[1],
                                                                         cache_PSW.device))
    return cache_PSW.view(-1, cache_PSW.shape[-1])[slot_BL], valid_BL


def _latent_slots(batch: AttentionBatch, block_size: int, device: torch.device):
    """The cache row of each sequence's positions (0 past its length) and which positions are valid;
    the same for every layer of a step."""
    pos_L = torch.arange(batch.max_seq_len, device=device)
    valid_BL = pos_L[None, :] < batch.seq_lens_B[:, None]
    page_BL = batch.block_tables_BM.gather(1, (pos_L // block_size).expand(batch.num_seqs, -1)
                                           .clamp(max=max(batch.block_tables_BM.shape[1] - 1, 0)))
    return torch.where(valid_BL, page_BL * block_size + pos_L % block_size, 0), valid_BL
