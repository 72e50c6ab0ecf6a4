"""Sampling: the filters keep exactly what they promise, draws follow each request's own seed."""

import torch

from moe_pd.engine.core.request import SamplingParams
from moe_pd.engine.sampler import filter_logits, sample


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 4.0, 4.5]])
    assert sample(logits, [SamplingParams()] * 2, [None, None]) == [1, 0]


def test_top_k_keeps_k():
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0])
    kept = filter_logits(logits, SamplingParams(temperature=1.0, top_k=2)).isfinite()
    assert kept.tolist() == [False, True, True, False]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    keep = lambda p: filter_logits(logits, SamplingParams(temperature=1.0, top_p=p)).isfinite().tolist()  # noqa
    assert keep(0.5) == [True, False, False, False]
    assert keep(0.6) == [True, True, False, False]
    assert keep(0.95) == [True, True, True, False]
    assert keep(1.0) == [True, True, True, True]


def test_temperature_sharpens():
    logits = torch.tensor([1.0, 2.0])
    cold = filter_logits(logits, SamplingParams(temperature=0.1)).softmax(-1)
    assert cold[1] > 0.99


def test_seeded_draws_do_not_depend_on_batch_neighbours():
    gen_logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0, top_k=20, top_p=0.9)
    alone = [sample(gen_logits[1:2], [p], [torch.Generator().manual_seed(7)])[0] for _ in range(3)]
    batched = sample(gen_logits, [p, p, p], [torch.Generator().manual_seed(s) for s in (1, 7, 3)])[1]
    assert alone == [batched] * 3


def test_draws_follow_the_distribution():
    logits = torch.tensor([[0.0, 1.0]])
    gen = torch.Generator().manual_seed(0)
    draws = [sample(logits, [SamplingParams(temperature=1.0)], [gen])[0] for _ in range(2000)]
    assert abs(sum(draws) / 2000 - torch.sigmoid(torch.tensor(1.0)).item()) < 0.04
