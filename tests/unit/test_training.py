"""The tiny checkpoint's training pieces: the corpus is a pure function of (seed, index), the tokenizer is
reproducible and round-trips any text, and the training forward computes what the served model computes."""

import torch

from helpers.runner import forward_logits, mtp_logits
from helpers.tiny import TINY
from moe_pd.model.loader import build_model
from moe_pd.training.corpus import document, documents
from moe_pd.training.forward import losses, main_states, mtp_states
from moe_pd.training.tokenizer import BOS, EOS, train_tokenizer


def test_corpus_documents_are_pure_functions_of_seed_and_index():
    assert document(0, 17) == document(0, 17) == list(documents(0, 3, 16))[1]
    assert document(0, 17) != document(1, 17)
    kinds = {document(0, i).split(" ")[0] for i in range(200)}
    assert {"Once", "Question:", "The"} <= kinds


def test_tokenizer_is_reproducible_and_round_trips_any_text():
    texts = list(documents(1, 300))
    a, b = train_tokenizer(texts, 400), train_tokenizer(texts, 400)
    assert a.to_str() == b.to_str()
    assert (a.token_to_id(BOS), a.token_to_id(EOS)) == (0, 1)  # DeepSeek-V3's ids
    for text in ["Once upon a time, there was a cat.", "Ünïcödé and emoji 🙂 never seen in training", "7 + 5 = 12"]:
        enc = a.encode(text)
        assert enc.ids[0] == 0 and a.decode(enc.ids, skip_special_tokens=True) == text


def test_training_forward_equals_the_paged_serving_forward():
    """Whole-sequence attention with SDPA (training) against the paged cache (serving), main model and MTP
    layer, on the tiny random model; the losses are the cross-entropies of those logits."""
    model = build_model(TINY, mtp=True)
    ids = [256, *b"training equals serving"]
    with torch.no_grad():
        states = main_states(model, torch.tensor([ids]))
        torch.testing.assert_close(model.logits(states)[0], forward_logits(model, [ids])[0], rtol=1e-4, atol=1e-4)
        drafted = mtp_states(model.mtp[0], torch.tensor([ids[1:]]), states[:, :-1])
        torch.testing.assert_close(model.mtp[0].logits(drafted)[0], mtp_logits(model, ids), rtol=1e-4, atol=1e-4)
        main, extra = losses(model, torch.tensor([ids]))
    want = torch.nn.functional.cross_entropy(forward_logits(model, [ids])[0][:-1], torch.tensor(ids[1:]))
    torch.testing.assert_close(main, want, rtol=1e-4, atol=1e-4)
    assert extra > 0


def test_chunked_training_equals_uninterrupted_training(tmp_path, monkeypatch):
    """Resuming from state.pt at a step boundary gives the weights one uninterrupted run gives (3 short steps)."""
    from moe_pd.training import train_tiny

    monkeypatch.setattr(train_tiny, "BATCH", 2)
    monkeypatch.setattr(train_tiny, "SEQ", 32)
    monkeypatch.setattr(train_tiny, "STEPS", 3)
    monkeypatch.setattr(train_tiny, "EVAL_EVERY", 2)
    assert train_tiny.train(tmp_path / "whole", 10.0)
    assert not train_tiny.train(tmp_path / "chunked", 10.0, max_steps=1)
    assert train_tiny.train(tmp_path / "chunked", 10.0)
    whole, chunked = (torch.load(tmp_path / d / "state.pt", weights_only=False) for d in ("whole", "chunked"))
    assert whole["step"] == chunked["step"] == 3
    for name, value in whole["model"].items():
        assert torch.equal(value, chunked["model"][name]), name
    assert whole["history"]["loss"] == chunked["history"]["loss"]
