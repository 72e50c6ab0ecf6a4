"""The KV tiers wired into the engine: a prefix evicted from the device pages comes back from host DRAM or
disk (PROMOTING, then the batch), the tokens never change, a hit is taken only when loading beats
recomputing, a finished turn's prompt + answer is there for the next turn, a restart on the same directory
hits, and two engines on one node share the DRAM tier."""

import threading

import pytest

from helpers.tiny import TINY
from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.engine.core.request import SamplingParams, State
from moe_pd.engine.core.tier_cost import LoadOrCompute
from moe_pd.engine.llm_engine import LLMEngine
from moe_pd.model.loader import build_model

BS = 4
PROMPTS = [[256, *(bytes([65 + i]) * (20 + 3 * i)), *b" tail"] for i in range(6)]
"""Six distinct prompts of 26-41 tokens: together 3x the device pool below, so revisits miss the device."""


@pytest.fixture(scope="module")
def model():
    return build_model(TINY)


def make(model, tmp_path, dram=True, disk=False, pages=24, name="pool", **kv):
    """An engine whose tiers are files under tmp_path. Its cost model always loads (a page of 4 tokens of
    this tiny model recomputes in about as long as a disk read takes: the measured choice would vary
    from run to run); test_a_load_slower_than_recomputing_is_not_taken and the cost model's own test
    cover the choice."""
    cfg = KVCacheConfig(block_size=BS, num_blocks=pages, host_tier_gib=(1 / 1024 if dram else 0),
                        host_tier_path=str(tmp_path / name), disk_tier_dir=str(tmp_path / "disk") if disk else "",
                        **kv)
    engine = LLMEngine(model, cfg, 4, 64)
    engine.scheduler.cost.seconds_per_token = 1.0
    engine.scheduler.cost.observe_prefill = lambda tokens, seconds: None
    return engine


def run(engine, prompts, max_new=4, sampled=False, tag=""):
    """Each prompt to completion in turn (the device pool then holds only the latest ones); tokens by prompt."""
    out = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=1.0, top_k=20) if sampled else SamplingParams()
        req = engine.add_request(f"{tag}{i}", prompt, max_new, params, seed=100 + i, ignore_eos=True)
        states = set()
        while engine.has_work:
            states.add(req.state)
            engine.step()
            engine.requests.check()
        out.append(list(req.output_ids))
        req.states_seen = states
    if engine.tiers is not None:
        engine.tiers.flush()
    return out


_cold: dict = {}


def cold(model, tmp_path, prompts, sampled=False):
    """Tokens of an engine without tiers (computed once per module for each workload)."""
    key = (tuple(map(tuple, prompts)), sampled)
    if key not in _cold:
        _cold[key] = run(make(model, tmp_path, dram=False), prompts, sampled=sampled)
    return _cold[key]


def full_prefix(prompt) -> int:
    """Prompt tokens a cache can serve: whole pages, at least one token left to compute."""
    return (len(prompt) - 1) // BS * BS


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_revisits_hit_dram_and_tokens_equal_a_run_without_tiers(model, tmp_path, sampled):
    assert make(model, tmp_path, dram=False).tiers is None
    want = cold(model, tmp_path, PROMPTS + PROMPTS, sampled)
    engine = make(model, tmp_path)
    got = run(engine, PROMPTS + PROMPTS, sampled=sampled)
    assert got == want
    revisits = sum(full_prefix(p) for p in PROMPTS)
    by_source = engine.requests.cached_by_source
    assert by_source["dram"] + by_source["device"] >= revisits  # every revisit served its whole-page prefix
    assert by_source["dram"] >= revisits // 2  # mostly from DRAM: the device holds only the latest prompts
    usage = engine.tier_usage()
    assert usage["promoted_pages"]["dram"] * BS == by_source["dram"] and usage["promotion_misses"] == 0
    engine.close()


def test_a_finished_turn_is_there_for_the_next_one(model, tmp_path):
    engine = make(model, tmp_path, pages=16)
    turn1 = PROMPTS[0]
    answer = run(engine, [turn1], max_new=10)[0]
    run(engine, PROMPTS[1:4], tag="other")  # pushes the first conversation off the device
    turn2 = turn1 + answer + list(b" and then?")
    cached_before = engine.requests.cached_tokens
    got = run(engine, [turn2], tag="t2")[0]
    # prompt + answer, whole pages (the answer's last token has no KV yet: it was never fed back)
    assert engine.requests.cached_tokens - cached_before == (len(turn1) + len(answer) - 1) // BS * BS
    assert got == cold(model, tmp_path, [turn2])[0]
    engine.close()


def test_disk_only_restart_hits_and_gives_the_same_tokens(model, tmp_path):
    first = make(model, tmp_path, dram=False, disk=True)
    assert run(first, PROMPTS) == cold(model, tmp_path, PROMPTS)
    first.close()
    again = make(model, tmp_path, dram=False, disk=True)
    assert run(again, PROMPTS) == cold(model, tmp_path, PROMPTS)
    assert again.requests.cached_by_source["disk"] == sum(full_prefix(p) for p in PROMPTS)
    again.close()


def test_two_engines_share_the_node_dram_tier(model, tmp_path):
    a, b = make(model, tmp_path, name="shared"), make(model, tmp_path, name="shared")
    assert run(a, PROMPTS[:2]) == run(b, PROMPTS[:2]) == cold(model, tmp_path, PROMPTS[:2])
    assert b.requests.cached_by_source["dram"] == sum(full_prefix(p) for p in PROMPTS[:2])
    a.close()
    b.close()


def test_write_back_offers_what_the_device_evicts(model, tmp_path):
    engine = make(model, tmp_path, tier_write_policy="write_back")
    assert run(engine, PROMPTS + PROMPTS) == cold(model, tmp_path, PROMPTS + PROMPTS)
    assert engine.requests.cached_by_source["dram"] > 0
    engine.close()


def test_a_load_slower_than_recomputing_is_not_taken(model, tmp_path):
    engine = make(model, tmp_path)
    run(engine, PROMPTS)
    engine.scheduler.cost.seconds_per_page["dram"] = 10.0  # as if DRAM pages took 10 s each
    assert run(engine, PROMPTS, tag="again") == cold(model, tmp_path, PROMPTS)
    assert engine.requests.cached_by_source["dram"] == 0 and engine.tier_usage()["promotions"] == 0
    engine.close()


def test_a_request_aborted_while_promoting_frees_its_pages_once_the_copies_end(model, tmp_path):
    engine = make(model, tmp_path)
    run(engine, PROMPTS)
    hold = threading.Event()
    engine.tiers._submit(0, lambda: hold.wait(10))  # the tier thread is busy: the promotion cannot start
    req = engine.add_request("late", PROMPTS[0], 4)
    engine.scheduler._plan()  # admits it: PROMOTING, its pages taken
    assert req.state is State.PROMOTING and not req.promotion.ready()
    used = engine.allocator.num_used
    engine.abort("late")
    assert engine.allocator.num_used == used and engine.requests.draining  # not reusable yet
    engine.requests.check()
    hold.set()
    engine.tiers.flush()
    engine.requests.settle()
    assert not engine.requests.draining and engine.allocator.num_used == 0
    engine.close()


def test_cost_model_loads_only_the_pages_that_save_time():
    cost = LoadOrCompute(seconds_per_page={"dram": 1e-4, "disk": 5e-3}, seconds_per_token=1e-4)
    assert cost.pages_worth_loading(["dram"] * 3, 16) == 3  # 0.1 ms against 1.6 ms per page
    assert cost.pages_worth_loading(["dram", "dram", "disk", "disk"], 16) == 2  # a disk page costs 5 ms
    cost.observe_prefill(100, 0.11)  # one step: its mean seconds per token
    assert cost.seconds_per_token == pytest.approx(1.1e-3)
    cost.observe_prefill(1000, 0.2)  # a fixed 0.1 s a step plus 0.1 ms a token: the slope
    assert cost.seconds_per_token == pytest.approx(1e-4)
    noisy = LoadOrCompute()
    noisy.observe_prefill(100, 0.1)
    noisy.observe_prefill(1000, 0.1001)  # ten times the tokens in the same time: never under a tenth of the mean
    assert noisy.seconds_per_token == pytest.approx(0.1 * noisy._moments[1] / noisy._moments[0])
    cost.observe_load(["dram"], 1e-3)  # ten times the prediction
    assert cost.seconds_per_page["dram"] == pytest.approx(1e-4 * (0.8 + 0.2 * 10))
    cost.seconds_per_page["disk"] = 1.0  # one slow measurement: declined, but re-measured now and then
    taken = [cost.pages_worth_loading(["disk"] * 2, 16) for _ in range(2 * cost.probe_every)]
    assert taken == ([0] * (cost.probe_every - 1) + [2]) * 2
