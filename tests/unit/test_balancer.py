"""The PD cluster's load-balancing decisions on plain data."""

import pytest

from moe_pd.serve.balancer import (
    DecodeRankLoad,
    PrefillRankLoad,
    assign_prefill,
    attention_work,
    pick_decode_rank,
    pick_prefill_instance,
)


def test_attention_work_counts_causal_pairs():
    assert attention_work(4, 0) == 10  # 1 + 2 + 3 + 4
    assert attention_work(4, 2) == 2 * 2 + 3  # two new tokens see 2 cached keys each, plus 1 + 2


def test_prefill_spreads_tokens_and_attention():
    ranks = [PrefillRankLoad(0), PrefillRankLoad(1)]
    out = assign_prefill([("long", 1000, 0), ("a", 300, 0), ("b", 300, 0), ("c", 300, 0)], ranks)
    # the long prompt (most tokens and quadratic attention) alone; the three short ones together
    assert out["long"] == 0 and out["a"] == out["b"] == out["c"] == 1
    assert sorted(r.queued_tokens for r in ranks) == [900, 1000]


def test_prefill_counts_only_uncached_tokens():
    ranks = [PrefillRankLoad(0, queued_tokens=500), PrefillRankLoad(1)]
    out = assign_prefill([("hit", 4000, 3990)], ranks)  # 10 new tokens, but attention over 4000 keys
    assert out == {"hit": 1} and ranks[1].queued_tokens == 10


def test_decode_balances_kv_and_requests_and_refuses_when_full():
    ranks = [DecodeRankLoad(0, 90, 100, 10, 64), DecodeRankLoad(1, 20, 100, 40, 64), DecodeRankLoad(2, 30, 100, 5, 64)]
    assert pick_decode_rank(ranks, need_pages=5) == 2
    assert pick_decode_rank(ranks, need_pages=75) == 1  # only rank 1 has 80 free pages
    assert pick_decode_rank([DecodeRankLoad(0, 0, 100, 64, 64)], 1) is None  # no slot
    assert pick_decode_rank(ranks, need_pages=200) is None


def test_prefill_instance_prefers_the_cached_prefix():
    assert pick_prefill_instance({"p1": 512}, {"p0": 0, "p1": 900}) == "p1"
    assert pick_prefill_instance({}, {"p0": 100, "p1": 50}) == "p1"
    assert pick_prefill_instance({}, {"p1": 0, "p0": 0}) == "p0"
    with pytest.raises(ValueError, match="no prefill instances"):
        pick_prefill_instance({}, {})


def test_prefill_goes_where_its_prefix_is_cached_unless_that_rank_is_swamped():
    ranks = [PrefillRankLoad(0), PrefillRankLoad(1)]
    assert assign_prefill([("r", 1000, {1: 960})], ranks) == {"r": 1}
    assert ranks[1].queued_tokens == 40 and ranks[0].queued_tokens == 0
    busy = [PrefillRankLoad(0), PrefillRankLoad(1, queued_tokens=5000)]
    assert assign_prefill([("r", 1000, {1: 960})], busy) == {"r": 0}
