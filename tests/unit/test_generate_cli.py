"""`python -m moe_pd.generate` end to end, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parents[1] / "golden" / "tiny_generate.jsonl"


def generate(*overrides, check=True):
    proc = subprocess.run([sys.executable, "-m", "moe_pd.generate", *overrides, "runtime.log_level=WARNING"],
                          capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def records(proc):
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_tiny_model_output_is_reproducible():
    """Fixed-seed random weights: the same tokens on every run and machine (golden file)."""
    golden = [json.loads(line) for line in GOLDEN.read_text().splitlines()]
    prompts = ",".join(json.dumps(g["prompt"]) for g in golden)
    out = records(generate(f"prompts=[{prompts}]", "sampling.max_new_tokens=16"))
    assert [r["output_ids"] for r in out] == [g["output_ids"] for g in golden]
    assert [r["prompt"] for r in out] == [g["prompt"] for g in golden]
    assert all(isinstance(r["text"], str) and r["finish_reason"] == "length" for r in out)
    assert all(r["timing"]["ttft_s"] > 0 for r in out)


def test_ids_file_and_output_file(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_ids": [256, 10, 20]}\n{"prompt": "hi"}\n')
    out = tmp_path / "out.jsonl"
    generate(f"prompts_file={prompts}", "prompt_ids=[[256,7]]", f"output={out}", "sampling.max_new_tokens=3",
             "sampling.temperature=0.7", "sampling.seed=5")
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_ids"] for r in got] == [[256, 7], [256, 10, 20], [256, *b"hi"]]
    assert all(len(r["output_ids"]) == 3 for r in got)


def test_checkpoint_path(hf_checkpoints):
    _, path = hf_checkpoints["v3_lora_groups_yarn"]
    out = records(generate("model=path", f"model.path={path}", "prompt_ids=[[0,5,6]]", "sampling.max_new_tokens=4"))
    assert len(out[0]["output_ids"]) <= 4 and out[0]["text"] is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.no_such_field=1"], "no_such_field"),
        (["model=no_such_preset"], "no_such_preset"),
        (["prompts=[hi]", "model.n_group=3"], "model.n_routed_experts=16: must be divisible by n_group=3"),
        (['prompts=[""]'], "prompt 0 is empty"),
        ([], "no prompts"),
        (["prompt_ids=[[" + ",".join(["65"] * 1100) + "]]"], "has 1100 tokens and does not fit the context of 1024"),
        (["model=path", "model.path=/nonexistent", "prompt_ids=[[1]]"], "no config.json"),
    ],
)
def test_bad_input_fails_clearly(overrides, message):
    proc = generate(*overrides, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_checkpoint_tokenizer_json(hf_checkpoints, tmp_path):
    """Text prompts go through the checkpoint's tokenizer.json (the `tokenizers` package), BOS prepended."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoints["v3_lora_groups_yarn"][1], path)
    vocab = {"<bos>": 0, "<eos>": 1, "hello": 5, "world": 6, "[UNK]": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    out = records(generate("model=path", f"model.path={path}", "prompts=[hello world]", "sampling.max_new_tokens=3"))
    assert out[0]["prompt_ids"] == [0, 5, 6]
    assert isinstance(out[0]["text"], str)


def test_cuda_graphs_without_the_kernels_is_a_clear_error():
    proc = subprocess.run([sys.executable, "-m", "moe_pd.generate", "prompts=[hi]", "runtime.cuda_graphs=true"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "runtime.cuda_graphs needs the Triton kernels" in proc.stderr
