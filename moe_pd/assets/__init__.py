"""Files shipped with moe_pd.

TINY_BYTES_TOKENIZER: the random tiny model's byte-level tokenizer (conf/model/tiny.yaml) as a tokenizer folder
that transformers' AutoTokenizer, and so the clients built on it (lm_eval, aiperf, guidellm), load:
`tokenizer=<TINY_BYTES_TOKENIZER>` (docs/serving.md, "Clients").

TINY_DSV3: the trained tiny DeepSeek-V3-shaped checkpoint (config.json, model.safetensors with its MTP layer,
tokenizer.json; docs/tiny_checkpoint.md), loadable as `model=path model.path=<TINY_DSV3>`."""

from pathlib import Path

TINY_BYTES_TOKENIZER = Path(__file__).parent / "tiny_bytes"
TINY_DSV3 = Path(__file__).parent / "tiny_dsv3"
