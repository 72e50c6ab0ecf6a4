"""Tokenizers: bytes for the tiny model, a checkpoint's tokenizer.json through `tokenizers`."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from moe_pd.config.errors import ConfigError
from moe_pd.config.model import ModelConfig


class Tokenizer(Protocol):
    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; ids >= 256 are special (bos, eos) and decode to nothing."""

    def __init__(self, bos_token_id: int | None) -> None:
        self.bos_token_id = bos_token_id

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_token_id] if self.bos_token_id is not None and add_bos else []) + ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes | None:
        """The bytes a token stands for (None: a special token)."""
        return bytes([token]) if 0 <= token < 256 else None


class HFTokenizer:
    """A tokenizer.json file (the `tokenizers` package), with the model's bos prepended."""

    def __init__(self, file: Path, bos_token_id: int | None) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self._tok = _Tokenizer.from_file(str(file))
        self.bos_token_id = bos_token_id

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(cfg: ModelConfig) -> Tokenizer | None:
    """tokenizer.json of the checkpoint; bytes for a random-weight model; None when neither applies."""
    if cfg.path is not None:
        file = Path(cfg.path) / "tokenizer.json"
        return HFTokenizer(file, cfg.bos_token_id) if file.is_file() else None
    if cfg.vocab_size < 256 + 2:
        raise ConfigError(f"model.vocab_size={cfg.vocab_size}: the byte tokenizer needs >= 258 ids")
    return ByteTokenizer(cfg.bos_token_id)
