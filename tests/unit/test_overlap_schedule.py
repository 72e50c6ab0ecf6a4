"""Micro-batch cuts and the interleaving order of the prefill and decode schedules."""

import torch

from helpers.tiny import TINY
from moe_pd.kvcache.paged import AttentionBatch
from moe_pd.model.loader import build_model
from moe_pd.model.transformer import STAGES
from moe_pd.overlap.micro_batch import split_step
from moe_pd.overlap.schedule import DECODE, PREFILL, chunks, run_interleaved


def test_prefill_cut_splits_a_long_prompt_between_micro_batches():
    batch = AttentionBatch.build([[0, 1, 2, 3, 4], [5, 6]], [0, 2], [17, 3], 4)
    ids = torch.arange(20)
    (ids0, b0), (ids1, b1) = split_step(ids, batch)
    assert torch.equal(torch.cat([ids0, ids1]), ids)
    assert b0.host_query_lens == [10] and b0.host_context_lens == [0]
    assert b1.host_query_lens == [7, 3] and b1.host_context_lens == [10, 2]  # the rest sees the first part
    assert b1.positions_T[:7].tolist() == list(range(10, 17))


def test_decode_cut_between_sequences_and_empty_steps():
    batch = AttentionBatch.build([[0], [1], [2]], [3, 5, 7], [1, 1, 1], 16)
    (_, b0), (_, b1) = split_step(torch.arange(3), batch)
    assert b0.host_query_lens == [1, 1] and b1.host_query_lens == [1]
    empty = AttentionBatch.build([], [], [], 16)
    (i0, e0), (i1, e1) = split_step(torch.zeros(0, dtype=torch.int64), empty)
    assert i0.numel() == i1.numel() == 0 and e0.num_seqs == e1.num_seqs == 0


def test_schedules_yield_where_deepseek_does():
    model = build_model(TINY)
    layers = TINY.num_hidden_layers
    assert len(chunks(model, PREFILL)) == 2 * layers + 1  # after dispatch and after combine issue
    assert len(chunks(model, DECODE)) == 5 * layers + 1  # five stages; output joins the next layer's ATTN-0
    assert DECODE.delta == 2 and PREFILL.delta == 0 and STAGES[0] == "ATTN-0"


def test_interleaving_order():
    """Micro-batch 1 starts `delta` chunks behind micro-batch 0, and 0 goes first in every round."""

    class Recorder:
        def __init__(self, label):
            self.label = label

    trace = []

    class FakeLayer:
        def stages(self):
            return [lambda s, n=n: trace.append((s.label, n)) for n in STAGES]

    class FakeModel:
        class model:
            layers = [FakeLayer(), FakeLayer()]

    run_interleaved(FakeModel, [Recorder("a"), Recorder("b")], DECODE)
    # a runs ATTN-0 and ATTN-1 alone; then each round is (a, b): a's dispatch + SHARED pairs with b's ATTN-0.
    assert trace[:4] == [("a", "ATTN-0"), ("a", "ATTN-1"), ("a", "SHARED"), ("b", "ATTN-0")]
    assert trace[4:6] == [("a", "MLP"), ("b", "ATTN-1")]
    assert [n for who, n in trace if who == "a"] == list(STAGES) * 2
    assert [n for who, n in trace if who == "b"] == list(STAGES) * 2
