"""The tiny checkpoint's tokenizer: byte-level BPE trained on the generated corpus with the `tokenizers`
package, saved as a `tokenizer.json` that `tokenizers`, transformers' AutoTokenizer (and so lm_eval) load.

Byte-level (GPT-2's pre-tokenizer and decoder): every UTF-8 string encodes, unknown words fall back to byte
tokens. Special tokens spell DeepSeek-V3's and take its ids (bos 0, eos 1); a template post-processor prepends
bos the way DeepSeek-V3's tokenizer.json does, so a client that adds special tokens gets the same ids as
moe_pd (which prepends bos itself).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """BPE merges learnt from `texts` (deterministic for the same texts and `tokenizers` version)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos)])
    return tok


def save_tokenizer(tok: Tokenizer, path: str | Path, max_length: int) -> None:
    """tokenizer.json plus the tokenizer_config.json transformers reads (fast tokenizer class, bos/eos)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
              "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": max_length}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
