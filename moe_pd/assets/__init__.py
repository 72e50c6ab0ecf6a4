"""Files shipped with moe_pd. TINY_BYTES_TOKENIZER: the random tiny model's byte-level tokenizer
(conf/model/tiny.yaml) as a tokenizer folder that transformers' AutoTokenizer, and so the clients built on it
(lm_eval, aiperf, guidellm), load: `tokenizer=<TINY_BYTES_TOKENIZER>` (docs/serving.md, "Clients")."""

from pathlib import Path

TINY_BYTES_TOKENIZER = Path(__file__).parent / "tiny_bytes"
