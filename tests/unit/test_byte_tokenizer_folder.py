"""The tiny model's byte tokenizer as a Hugging Face tokenizer folder (moe_pd/assets/tiny_bytes): what
AutoTokenizer loads from it equals moe_pd's own ByteTokenizer id for id, so clients that count or decode
tokens with it (lm_eval, aiperf, guidellm) agree with the server; the shipped files are what the generator
writes."""

import json

import pytest

from moe_pd.assets import TINY_BYTES_TOKENIZER
from moe_pd.assets.byte_tokenizer import write
from moe_pd.engine.tokenizer import ByteTokenizer
from moe_pd.serve.openai_api import render_chat

TEXTS = ["Hello", "né✓ 😀 x", "  two  spaces\n\ttab", "", "<｜begin▁of▁sentence｜> literal", "\x00\x7f"]


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_BYTES_TOKENIZER))


@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_text_equal_the_servers(hf, text):
    ours = ByteTokenizer(256)
    assert hf(text)["input_ids"] == ours.encode(text)
    assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text, add_bos=False)
    ids = ours.encode(text) + [257]
    assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids) == text


def test_vocabulary_special_tokens_and_chat_template(hf):
    assert (len(hf), hf.bos_token_id, hf.eos_token_id) == (320, 256, 257)
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text",
                                                                                              "text": "Hi"}]}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == render_chat(messages)


def test_the_shipped_folder_is_what_the_generator_writes(tmp_path):
    write(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads((TINY_BYTES_TOKENIZER / name).read_text())
