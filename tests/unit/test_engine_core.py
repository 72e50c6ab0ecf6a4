"""Torch-free engine core: page accounting with a prefix cache, chunked prefill, preemption, aborts."""

import random

import pytest

from moe_pd.engine.core.request import InvalidRequest, Request, State
from moe_pd.engine.core.scheduler import Scheduler
from moe_pd.kvcache import block_manager
from moe_pd.kvcache.block_manager import BlockManager, OutOfBlocks
from moe_pd.kvcache.transfer.base import Transfer


def fake_next_token(tokens: list[int]) -> int:
    """A deterministic 'model': the next token depends on the whole sequence."""
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) * 2654435761) % 97


def run(scheduler: Scheduler, max_steps: int = 10_000) -> dict[str, list[int]]:
    """Drives the scheduler with the fake model; checks the plan's and the request table's invariants every
    step. Returns the outputs of the requests that finished."""
    steps = 0
    seen: dict[str, Request] = {}
    while scheduler.has_work:
        plan = scheduler.schedule()
        seen.update({s.seq.request_id: s.seq for s in plan.scheduled})
        assert plan.num_tokens <= scheduler.token_budget
        assert len(scheduler.running) <= scheduler.max_num_seqs
        for item in plan.scheduled:
            assert len(item.seq.block_table) * scheduler.allocator.block_size >= item.context + item.num_new
        sampled = {s.seq.request_id: fake_next_token(s.seq.token_ids) for s in plan.scheduled if s.samples}
        scheduler.update(plan, sampled)
        scheduler.requests.check(ended=[r for r in seen.values() if r.state.final])
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
    return {r.request_id: r.output_ids for r in seen.values() if r.state is State.FINISHED}


def reference(prompts, max_new):
    out = {}
    for rid, prompt in prompts.items():
        tokens = list(prompt)
        for _ in range(max_new):
            tokens.append(fake_next_token(tokens))
        out[rid] = tokens[len(prompt):]
    return out


def make(prompts, max_new, **kw):
    return [Request(list(p), max_new, request_id=rid, **kw) for rid, p in prompts.items()]


# allocator -------------------------------------------------------------------------------------------------
def test_prefix_hit_reuses_pages_and_counts_references():
    alloc = BlockManager(num_blocks=8, block_size=4)
    a, hit = alloc.admit(list(range(10)), 10)
    assert hit == 0 and len(a) == 3
    alloc.commit(a, list(range(10)), 10)  # pages 0 and 1 are full and registered
    b, hit = alloc.admit(list(range(8)) + [99, 98, 97], 11)
    assert hit == 8 and b[:2] == a[:2] and b[2] not in a
    assert alloc.pages[a[0]].ref_count == 2
    alloc.free(a)
    assert alloc.pages[b[0]].ref_count == 1 and alloc.num_used == 3
    alloc.free(b)
    assert alloc.num_used == 0 and alloc.num_free == 8


def test_hit_stops_one_token_before_the_end():
    alloc = BlockManager(num_blocks=8, block_size=4)
    t, _ = alloc.admit(list(range(8)), 8)
    alloc.commit(t, list(range(8)), 8)
    _, hit = alloc.admit(list(range(8)), 8)  # everything cached, but the last token must be computed
    assert hit == 4


def test_hash_collision_is_caught_by_the_token_check(monkeypatch):
    monkeypatch.setattr(block_manager, "chain_hash", lambda previous, tokens: 42)
    alloc = BlockManager(num_blocks=8, block_size=4)
    t, _ = alloc.admit([1, 2, 3, 4, 5], 5)
    alloc.commit(t, [1, 2, 3, 4, 5], 5)
    _, hit = alloc.admit([9, 9, 9, 9, 9], 5)
    assert hit == 0


def test_unreferenced_cached_pages_are_evicted_lru():
    alloc = BlockManager(num_blocks=4, block_size=2)
    first, _ = alloc.admit([1, 2, 3], 2)
    alloc.commit(first, [1, 2, 3], 2)
    second, _ = alloc.admit([5, 6, 7], 2)
    alloc.commit(second, [5, 6, 7], 2)
    alloc.free(first)
    alloc.free(second)
    assert alloc.num_free == 4 and len(alloc.match_prefix([1, 2])) == 1
    alloc.admit([8, 8, 8, 8, 8, 8], 6)  # needs 3 pages: 2 free + the oldest cached page (tokens 1, 2)
    assert alloc.match_prefix([1, 2]) == [] and len(alloc.match_prefix([5, 6])) == 1


def test_admit_is_all_or_nothing():
    alloc = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(OutOfBlocks):
        alloc.admit(list(range(12)), 12)
    assert alloc.num_free == 2


# scheduler -------------------------------------------------------------------------------------------------
def test_outputs_match_the_reference_and_pages_return():
    prompts = {f"r{i}": [random.Random(i).randrange(97) for _ in range(3 + 5 * i)] for i in range(6)}
    alloc = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(alloc, max_num_seqs=4, token_budget=16, max_context=1000)
    for seq in make(prompts, 7):
        sched.add(seq)
    assert run(sched) == reference(prompts, 7)
    assert alloc.num_used == 0


def test_chunked_prefill_respects_the_budget():
    alloc = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(alloc, max_num_seqs=4, token_budget=8, max_context=1000)
    sched.add(Request(list(range(30)), 2, request_id="long"))
    sizes = []
    while sched.has_work:
        plan = sched.schedule()
        sizes.append([(s.context, s.num_new) for s in plan.scheduled])
        sched.update(plan, {s.seq.request_id: 1 for s in plan.scheduled if s.samples})
    assert sizes[:4] == [[(0, 8)], [(8, 8)], [(16, 8)], [(24, 6)]]
    assert sizes[4] == [(30, 1)]  # then decode


def test_decodes_go_first_and_prefill_fills_the_rest():
    alloc = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(alloc, max_num_seqs=4, token_budget=10, max_context=1000)
    sched.add(Request([1, 2, 3], 5, request_id="a"))
    plan = sched.schedule()
    sched.update(plan, {"a": 7})
    sched.add(Request(list(range(40)), 5, request_id="b"))
    plan = sched.schedule()
    assert [(s.seq.request_id, s.num_new) for s in plan.scheduled] == [("a", 1), ("b", 9)]


def test_preemption_recomputes_and_never_changes_outputs():
    prompts = {f"r{i}": [(7 * i + j) % 97 for j in range(6 + i)] for i in range(5)}
    small = BlockManager(num_blocks=9, block_size=4)  # too small for all at once
    sched = Scheduler(small, max_num_seqs=5, token_budget=64, max_context=1000)
    seqs = make(prompts, 12)
    for seq in seqs:
        sched.add(seq)
    assert run(sched) == reference(prompts, 12)
    assert sum(s.num_preemptions for s in seqs) > 0
    assert small.num_used == 0


def test_request_larger_than_the_cache_fails_clearly():
    alloc = BlockManager(num_blocks=2, block_size=4)
    sched = Scheduler(alloc, max_num_seqs=2, token_budget=64, max_context=1000)
    with pytest.raises(InvalidRequest, match="request huge needs 6 KV pages, the cache has 2"):
        sched.add(Request(list(range(20)), 3, request_id="huge"))
    sched.add(Request([1, 2], 3, request_id="ok"))
    assert run(sched) == reference({"ok": [1, 2]}, 3)


def test_abort_frees_pages_everywhere():
    alloc = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(alloc, max_num_seqs=1, token_budget=64, max_context=1000)
    sched.add(Request([1, 2, 3, 4, 5], 10, request_id="running"))
    sched.add(Request([6, 7], 10, request_id="queued"))
    plan = sched.schedule()
    sched.update(plan, {"running": 3})
    assert sched.abort("queued").state is State.ABORTED
    assert sched.abort("running").finish_reason == "abort"
    assert alloc.num_used == 0 and not sched.has_work and sched.abort("nobody") is None


def test_prefix_cache_skips_computation_for_a_shared_prefix():
    alloc = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(alloc, max_num_seqs=4, token_budget=64, max_context=1000)
    system = list(range(16))
    sched.add(Request(system + [50, 51], 2, request_id="first"))
    run(sched)
    second = Request(system + [60], 2, request_id="second")
    sched.add(second)
    plan = sched.schedule()
    assert plan.scheduled[0].context == 16 and plan.scheduled[0].num_new == 1 and second.num_cached_hit == 16


def test_context_limit_and_bad_requests():
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=2, token_budget=64, max_context=10)
    with pytest.raises(InvalidRequest, match="does not fit the context of 10"):
        sched.add(Request(list(range(10)), 1))
    seq = Request(list(range(8)), 50)
    sched.add(seq)
    run(sched)
    assert len(seq.output_ids) == 2 and seq.finish_reason == "length"
    with pytest.raises(InvalidRequest, match="the prompt is empty"):
        sched.add(Request([], 1))
    with pytest.raises(InvalidRequest, match="max_new_tokens must be > 0"):
        Request([1], 0)


@pytest.mark.parametrize("seed", range(8))
def test_random_workloads(seed):
    rng = random.Random(seed)
    prompts = {f"r{i}": [rng.randrange(97) for _ in range(rng.randint(1, 40))] for i in range(rng.randint(1, 12))}
    shared = [rng.randrange(97) for _ in range(8)]
    prompts.update({f"s{i}": shared + [i] for i in range(3)})  # shared prefixes
    alloc = BlockManager(num_blocks=rng.randint(12, 40), block_size=rng.choice([2, 4, 8]))
    sched = Scheduler(alloc, max_num_seqs=rng.randint(1, 6), token_budget=rng.randint(4, 64), max_context=200)
    max_new = rng.randint(1, 10)
    added = []
    for seq in make(prompts, max_new):
        try:
            added.append(sched.add(seq).request_id)
        except InvalidRequest:  # can never fit this cache
            assert alloc.blocks_for(len(seq.prompt_ids) + max_new) > alloc.num_blocks
    out = run(sched)
    expected = reference(prompts, max_new)
    assert out == {k: expected[k] for k in added}
    assert alloc.num_used == 0


def test_engine_core_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; import moe_pd.engine.core.scheduler, moe_pd.kvcache.block_manager; "
            "assert 'torch' not in sys.modules, 'the engine core imported torch'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_abort_while_receiving_frees_the_reservation():
    alloc = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(alloc, max_num_seqs=2, token_budget=64, max_context=1000)
    pages = sched.reserve(Request(list(range(10)), 5, request_id="in-transit"), Transfer(deadline=1e18))
    assert alloc.num_used == 3 and len(pages) == 3 and sched.has_work
    assert sched.abort("in-transit").state is State.ABORTED
    assert alloc.num_used == 0 and not sched.has_work


def test_token_slice_equals_slicing_token_ids():
    seq = Request([1, 2, 3, 4], 9)
    seq.output_ids = [5, 6, 7]
    for start in range(8):
        for end in range(start, 8):
            assert seq.token_slice(start, end) == seq.token_ids[start:end]
