"""Who may read a tier entry: the model's identity, and the chained keys of its pages (no torch).

A tier entry outlives the process that wrote it (the disk tier survives restarts, the DRAM tier outlives
any one instance), so a page's key must say which model computed it. The identity digest folds in the
model's config, a fingerprint of its weights, the cache dtype, the KV layout and the block size; it is the
parent of a sequence's first page, so every key of the chain depends on it and a different checkpoint
can never meet an entry of another one, even in a shared directory.

Page keys are 128-bit BLAKE2b chains over (parent key, page tokens), the scheme SGLang's HiCache storage
uses with SHA-256: unlike Python's `hash`, a collision cannot be constructed cheaply, and the keys are the
same in every process and Python build. Every hit is still confirmed against the page's stored tokens and
parent key, so even a collision would be a miss, never someone else's latents.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

KEY_BYTES = 16
FORMAT_VERSION = 1
"""Bumped whenever the entry format or the key derivation changes: old entries then never match."""
_SAMPLES_PER_FILE = 8
_SAMPLE_BYTES = 1 << 16


def page_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a page whose predecessor's key (or, for the first page, the model digest) is `parent`."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=KEY_BYTES).digest()


def chain_keys(parent: bytes, token_ids: Sequence[int], block_size: int, start_page: int = 0,
               num_pages: int | None = None) -> Iterator[tuple[bytes, bytes, tuple[int, ...]]]:
    """(key, parent key, tokens) of the full pages of `token_ids` from `start_page` on, lazily; `parent`
    is the key of page start_page - 1 (the model digest when start_page is 0)."""
    end = len(token_ids) // block_size
    if num_pages is not None:
        end = min(end, start_page + num_pages)
    for i in range(start_page, end):
        tokens = tuple(token_ids[i * block_size : (i + 1) * block_size])
        key = page_key(parent, tokens)
        yield key, parent, tokens
        parent = key


def weights_fingerprint(path: str | os.PathLike | None, init_seed: int = 0, init_std: float = 0.0) -> str:
    """A cheap fingerprint of a checkpoint: for every safetensors file its name, size, header (names,
    dtypes, shapes, offsets) and a few 64 KiB samples spread over its data, so a fine-tune with the same
    shapes differs. Random weights are identified by their seed and scale."""
    if path is None:
        return f"random:{init_seed}:{init_std!r}"
    digest = hashlib.blake2b(digest_size=KEY_BYTES)
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}: cannot fingerprint the weights")
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            head = f.read(8)
            digest.update(head)
            if len(head) == 8:
                digest.update(f.read(min(int.from_bytes(head, "little"), size)))
            for i in range(_SAMPLES_PER_FILE):
                f.seek(size * i // _SAMPLES_PER_FILE)
                digest.update(f.read(_SAMPLE_BYTES))
    return "safetensors:" + digest.hexdigest()


@dataclass(frozen=True)
class ModelIdentity:
    """Everything that decides the bytes of a cached page."""

    config: str
    """The model's architecture as canonical JSON (every field that changes the computation)."""
    weights: str
    """weights_fingerprint() of the checkpoint (or of the random initialisation)."""
    dtype: str
    """Element type of the cached latents, e.g. 'bfloat16'."""
    kv_layout: str
    """What one page holds and in which order, e.g. 'mla:L=61:row=512+64:LSW'."""
    block_size: int
    """Tokens per page."""

    @property
    def digest(self) -> bytes:
        text = json.dumps({"format": FORMAT_VERSION, **asdict(self)}, sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(text.encode(), digest_size=KEY_BYTES).digest()

    def describe(self) -> dict[str, Any]:
        """What the tiers write beside their entries, for people reading the directory."""
        return {"format": FORMAT_VERSION, "digest": self.digest.hex(), **asdict(self)}

    @staticmethod
    def of(model_cfg: Any, dtype: str, block_size: int, num_layers: int | None = None) -> "ModelIdentity":
        """From a ModelConfig: its fields except where the checkpoint lives (the fingerprint says what
        it holds, so a moved copy keeps its cache). `num_layers`: the cache's layers (the model's, plus the MTP
        layer's when it is loaded; default: the model's)."""
        fields = {k: v for k, v in asdict(model_cfg).items() if k != "path"}
        layout = (f"mla:L={num_layers or model_cfg.num_hidden_layers}:row={model_cfg.kv_lora_rank}+"
                  f"{model_cfg.qk_rope_head_dim}:LSW")
        return ModelIdentity(
            config=json.dumps(fields, sort_keys=True, default=str),
            weights=weights_fingerprint(model_cfg.path, model_cfg.init_seed, model_cfg.init_std),
            dtype=dtype.removeprefix("torch."), kv_layout=layout, block_size=block_size)
