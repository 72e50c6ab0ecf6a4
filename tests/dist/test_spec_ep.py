"""MTP speculative decoding with EP over two ranks (DP attention: each rank verifies its own requests and
accepts its own number of tokens per step, every all-to-all paired): greedy K = 2 on the trained checkpoint is
token-identical to transformers (so to K = 0, tests/unit/test_tiny_checkpoint.py), with redundant experts,
overlapped micro-batches and EPLB recording the MTP layer's load; the generate summary adds up both ranks."""

import json

import pytest
import torch

from helpers.torchrun import torchrun
from moe_pd.assets import TINY_DSV3
from moe_pd.engine.tokenizer import load_tokenizer

TEXTS = ["The capital of France is", "Once upon a time,", "Monday, Tuesday,", "Question: What is 3 + 4?\nAnswer:",
         "user: What does a cow say?\nassistant:"]
NEW = 20


def transformers_greedy(prompts):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(TINY_DSV3, dtype=torch.float32).eval()
    with torch.no_grad():
        return [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.int64),
                            max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=1)[0, len(p):].tolist()
                for p in prompts]


@pytest.mark.dist
def test_k2_over_two_ep_ranks_equals_transformers(tmp_path):
    from moe_pd.config.hf import resolve_model_config
    from moe_pd.config.model import ModelConfig

    prompts = [load_tokenizer(resolve_model_config(ModelConfig(path=str(TINY_DSV3)))).encode(t) for t in TEXTS]
    overrides = ["model=path", f"model.path={TINY_DSV3}", f"prompt_ids={json.dumps(prompts).replace(' ', '')}",
                 f"sampling.max_new_tokens={NEW}", "sampling.ignore_eos=true", "speculative.num_draft_tokens=2",
                 "parallel.num_redundant_experts=8", "eplb=record", f"eplb.dump_stats={tmp_path}/load.safetensors",
                 "overlap.enabled=true", "overlap.min_tokens=2", "runtime.log_level=INFO"]
    proc = torchrun(2, ["-m", "moe_pd.generate", *overrides], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["output_ids"] for r in records] == transformers_greedy(prompts)
    lines = [line for line in proc.stderr.splitlines() if "speculative decoding (K=2), 2 rank(s)" in line]
    assert len(lines) == 1, proc.stderr[-3000:]  # the summary over both ranks
    assert float(lines[0].split("mean acceptance length ")[1].split(",")[0]) > 1.5, lines

    from moe_pd.eplb.recorder import load_stats

    load = load_stats(tmp_path / "load.safetensors").expert_load_LE
    assert load[-1].sum() > 0  # the MTP layer's routing, recorded in its own row
