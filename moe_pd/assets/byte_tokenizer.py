"""Writes the tiny model's byte tokenizer (moe_pd.engine.tokenizer.ByteTokenizer: UTF-8 bytes are ids 0..255,
bos 256, eos 257, ids up to the vocabulary's 320 reserved) as tokenizer.json and tokenizer_config.json, so
that tools which load a Hugging Face tokenizer count and decode the served model's ids exactly.

    python -m moe_pd.assets.byte_tokenizer moe_pd/assets/tiny_bytes

The ids are the bytes themselves: a byte-level BPE (GPT-2's byte-to-character map, as Hugging Face's
ByteLevel pre-tokenizer uses) with the 256 byte characters as its vocabulary and no merges; special tokens
with DeepSeek-V3's bos and eos strings; bos prepended by the post-processor (add_special_tokens). The chat
template renders messages as the server does (moe_pd.serve.openai_api.render_chat).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
VOCAB_SIZE = 320
CHAT_TEMPLATE = ("{% for m in messages %}{{ 'system' if m['role'] == 'developer' else m['role'] }}: "
                 "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
                 "{{ p['text'] }}{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer produces)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = dict(zip(keep, map(chr, keep))), 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def build():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    chars = bytes_to_unicode()
    tok = Tokenizer(models.BPE({chars[b]: b for b in range(256)}, [], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS] + [f"<｜reserved_{i}｜>" for i in range(VOCAB_SIZE - 258)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, 256)])
    return tok


def write(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    build().save(str(out / "tokenizer.json"), pretty=True)
    # split_special_tokens: text that spells a special token is bytes, as the server encodes it
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
              "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": 1024, "split_special_tokens": True, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1]))
