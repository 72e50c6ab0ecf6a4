"""LLMEngine with speculative decoding (speculative.num_draft_tokens = K): greedy output token-identical to
transformers and to K = 0 on the trained checkpoint with its MTP layer; identical to K = 0 through chunked
prefill, prefix-cache hits, preemption, overlap, stop tokens and max_tokens; every page comes back; the
acceptance statistics count what the MTP layer got right."""

import pytest
import torch

from helpers.tiny import TINY
from moe_pd.assets import TINY_DSV3
from moe_pd.config.hf import resolve_model_config
from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.config.model import ModelConfig
from moe_pd.config.overlap import OverlapConfig
from moe_pd.config.sampling import SamplingConfig
from moe_pd.engine.core.request import SamplingParams
from moe_pd.engine.llm_engine import LLMEngine
from moe_pd.engine.offline import OfflineEngine
from moe_pd.engine.spec.engine_step import SpecStats
from moe_pd.engine.tokenizer import load_tokenizer
from moe_pd.kvcache.transfer.nixl_agent import nixl_available
from moe_pd.model.loader import build_model

TRAINED = resolve_model_config(ModelConfig(path=str(TINY_DSV3)))
TEXTS = ["The capital of France is", "Once upon a time,", "Monday, Tuesday,"]
PROMPTS = [[256, *b"Hello, moe_pd"], [256, *b"ab"], [256, *range(40, 79)], [256, *b"Hello, moe_pd!!"]]


@pytest.fixture(scope="module")
def tiny():
    return build_model(TINY, mtp=True)


def generate(model, prompts, k, new=12, blocks=256, block_size=4, **kw):
    engine = OfflineEngine(model, KVCacheConfig(block_size=block_size, num_blocks=blocks), 8, num_draft_tokens=k,
                           **kw)
    out = engine.generate(prompts, SamplingConfig(max_new_tokens=new, ignore_eos=True))
    assert engine.engine.allocator.num_used == 0  # every page back (cached ones evictable)
    engine.preemptions = sum(c.preemptions for c in out)
    return [c.output_ids for c in out], engine


def test_trained_checkpoint_k2_equals_transformers_and_k0():
    from transformers import AutoModelForCausalLM

    model = build_model(TRAINED, mtp=True)
    prompts = [load_tokenizer(TRAINED).encode(t) for t in TEXTS]
    plain, _ = generate(model, prompts, 0, 24, block_size=16)
    spec, engine = generate(model, prompts, 2, 24, block_size=16)
    hf = AutoModelForCausalLM.from_pretrained(TINY_DSV3, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.int64),
                           max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=1)[0, len(p):].tolist()
               for p in prompts]
    assert spec == plain == ref
    stats = engine.stats.spec
    assert stats.verifications > 0 and stats.mean_acceptance_length >= 1.5, stats.summary()
    assert stats.acceptance_rates[0] >= stats.acceptance_rates[1] > 0
    # fewer decode steps than tokens: several tokens a step
    assert engine.stats.decode_tokens == 3 * 23 and engine.stats.steps < 1 + 23


@pytest.mark.parametrize("k", [1, 3])
def test_chunks_prefix_hits_and_preemption_keep_the_tokens(tiny, k):
    """A small token budget chunks the prompts; prompts 0 and 3 share pages (prefix cache); a pool too small
    for every request at once preempts and recomputes (drafts dropped, drawn anew)."""
    want, _ = generate(tiny, PROMPTS, 0, 16)
    got, engine = generate(tiny, PROMPTS, k, 16, blocks=28, max_num_batched_tokens=16)
    assert got == want
    assert engine.preemptions > 0


def test_overlapped_micro_batches_keep_the_tokens(tiny):
    want, _ = generate(tiny, PROMPTS, 0)
    got, _ = generate(tiny, PROMPTS, 2, overlap=OverlapConfig(enabled=True, min_tokens=2))
    assert got == want


def test_stop_token_and_max_tokens_are_never_passed(tiny):
    """The stop token (here the 5th token of a K = 0 run) ends a verification's tokens; max_tokens caps them,
    and the stream's pieces add up to the output."""
    want, _ = generate(tiny, PROMPTS, 0, 12)
    stop = want[0][4]
    results = {}
    for k in (0, 3):
        engine = LLMEngine(tiny, KVCacheConfig(block_size=4, num_blocks=256), 8, 64, num_draft_tokens=k)
        engine.eos = stop
        for i, p in enumerate(PROMPTS):
            engine.add_request(str(i), p, 5 + i)
        streams, reasons = {}, {}
        while engine.has_work:
            for out in engine.step()[1]:
                streams.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finished:
                    reasons[out.request_id] = out.finish_reason
        results[k] = streams, reasons
        assert engine.allocator.num_used == 0
    assert results[3] == results[0]
    assert results[3][1]["0"] == "stop" and results[3][0]["0"][-1] == stop
    assert all(len(results[3][0][str(i)]) <= 5 + i for i in range(len(PROMPTS)))


def test_sampled_speculation_is_reproducible(tiny):
    params = SamplingParams(temperature=0.8, top_p=0.9)
    runs = []
    for _ in range(2):
        engine = OfflineEngine(tiny, KVCacheConfig(block_size=4, num_blocks=256), 8, num_draft_tokens=2)
        runs.append([c.output_ids for c in engine.generate(PROMPTS, SamplingConfig(
            max_new_tokens=10, ignore_eos=True, temperature=params.temperature, top_p=params.top_p, seed=3))])
    assert runs[0] == runs[1] and all(len(o) == 10 for o in runs[0])


def test_speculation_needs_the_mtp_layer():
    with pytest.raises(ValueError, match="MTP layer"):
        LLMEngine(build_model(TINY), KVCacheConfig(block_size=4, num_blocks=16), 8, 64, num_draft_tokens=2)


def test_acceptance_statistics():
    a, b = SpecStats(3), SpecStats(3)
    a.record([3, 0, 1])
    b.record([2])
    total = SpecStats.merged([a, b])
    assert (total.verifications, total.accepted, total.accepted_at) == (4, 6, [3, 2, 1])
    assert total.mean_acceptance_length == 2.5 and total.acceptance_rates == [0.75, 0.5, 0.25]
    assert "mean acceptance length 2.500" in total.summary()


@pytest.mark.parametrize("backend", ["zmq", pytest.param("nixl", marks=pytest.mark.skipif(
    not nixl_available(), reason="NIXL is not installed"))])
def test_pd_ships_the_mtp_rows_and_decode_speculates(backend):
    """Prefill (K = 2) runs the MTP layer over the prompt and ships its cache rows with the main layers', and the
    first drafts with the first token; decode (K = 2) verifies from its first step (it never runs a plain
    decode): the rows arrive unchanged, its tokens equal K = 0's (which equal transformers') and its drafts are
    accepted as often as a colocated engine's."""
    import time

    from moe_pd.engine.disagg import DecodeWorker, PrefillWorker
    from moe_pd.kvcache.transfer.select import make_receiver, make_sender

    model = build_model(TRAINED, mtp=True)
    prompts = [load_tokenizer(TRAINED).encode(t) for t in TEXTS]
    kv = KVCacheConfig(block_size=16, num_blocks=64, transfer=backend)
    prefill_engine = LLMEngine(model, kv, 8, 64, hold_finished_pages=True, num_draft_tokens=2)
    decode_engine = LLMEngine(model, kv, 8, 64, num_draft_tokens=2)
    sender = make_sender(backend, kv, prefill_engine.cache.kv_LPSW, "prefill", timeout_s=30)
    receiver = make_receiver(backend, kv, decode_engine.cache.kv_LPSW, "decode", timeout_s=0.5)
    prefill = PrefillWorker(prefill_engine, sender, timeout_s=30)
    decode = DecodeWorker(decode_engine, receiver, timeout_s=30)
    shipped, arrived = {}, {}
    send, activate = prefill.sender.send, decode.engine.activate

    def record_send(target, kv_LPSW, pages, header, *args):
        shipped[header.request_id] = kv_LPSW[-1, pages].flatten(0, 1)[: header.num_tokens].clone()
        assert len(header.drafts) == 2  # greedy: the first drafts travel with the first token
        return send(target, kv_LPSW, pages, header, *args)

    def record_activate(req, *args):
        rows = decode.engine.cache.kv_LPSW[-1, req.block_table].flatten(0, 1)[: len(req.prompt_ids)]
        arrived[req.request_id] = rows.clone()
        return activate(req, *args)

    prefill.sender.send, decode.engine.activate = record_send, record_activate
    plain_steps = []
    plain = decode.engine.speculative._plain
    decode.engine.speculative._plain = lambda items, emitted: (plain_steps.append(len(items)), plain(items, emitted))[1]
    try:
        for i, p in enumerate(prompts):
            req = decode.reserve(str(i), p, 24, ignore_eos=True)
            prefill.submit(str(i), p, decode.target(req))
        streams = {}
        deadline = time.monotonic() + 60
        while (prefill.has_work or decode.has_work) and time.monotonic() < deadline:
            prefill.step()
            for out in decode.step():
                streams.setdefault(out.request_id, []).extend(out.new_token_ids)
            time.sleep(0.001)
    finally:
        prefill.sender.close()
        decode.receiver.close()
    plain, colocated = generate(model, prompts, 0, 24, block_size=16)[0], generate(model, prompts, 2, 24,
                                                                                     block_size=16)[1]
    assert [streams[str(i)] for i in range(len(prompts))] == plain
    assert shipped.keys() == arrived.keys() == {str(i) for i in range(len(prompts))}
    for rid, rows in shipped.items():
        assert rows.abs().sum() > 0 and torch.equal(arrived[rid], rows), rid
    assert plain_steps == []
    spec = decode.engine.stats.spec
    assert abs(spec.mean_acceptance_length - colocated.stats.spec.mean_acceptance_length) < 0.25, spec.summary()
    assert decode.engine.allocator.num_used == 0 and prefill.engine.allocator.num_used == 0


def test_ranks_report_acceptance_and_metrics_add_it_up(tiny):
    import msgspec
    from prometheus_client import generate_latest

    from moe_pd.serve.metrics import Metrics
    from moe_pd.serve.rank import Rank

    engine = LLMEngine(tiny, KVCacheConfig(block_size=4, num_blocks=64), 8, 64, num_draft_tokens=2)
    engine.add_request("a", PROMPTS[0], 6, ignore_eos=True)
    while engine.has_work:
        engine.step()
    load = msgspec.to_builtins(Rank(engine, 0, 8).load())
    assert load["spec_verifications"] == engine.stats.spec.verifications > 0
    assert load["spec_accepted_at"] == engine.stats.spec.accepted_at
    from moe_pd.serve.engine_loop import EngineLoop

    local = Metrics()
    EngineLoop(engine).refresh(local)  # the one-process server's scrape
    length = 1 + engine.stats.spec.accepted / engine.stats.spec.verifications
    assert f'moe_pd_spec_mean_acceptance_length{{instance="local",role="colocated"}} {length}' in \
        generate_latest(local.registry).decode()
    metrics = Metrics()
    other = {**load, "rank": 1, "spec_verifications": 4, "spec_accepted_at": [3, 1]}
    metrics.instance("decode@x", "decode", True, [{**load, "spec_verifications": 4, "spec_accepted_at": [2, 0]},
                                                   other])
    text = generate_latest(metrics.registry).decode()
    assert 'moe_pd_spec_mean_acceptance_length{instance="decode@x",role="decode"} 1.75' in text
    assert 'moe_pd_spec_acceptance_rate{instance="decode@x",position="1",role="decode"} 0.625' in text
    assert 'moe_pd_spec_verifications{instance="decode@x",role="decode"} 8.0' in text
    metrics.instance("prefill@y", "prefill", True, [{**load, "spec_verifications": 0, "spec_accepted_at": []}])
    lines = generate_latest(metrics.registry).decode().splitlines()
    assert not [line for line in lines if line.startswith("moe_pd_spec") and "prefill@y" in line]  # no drafts


def test_verification_stops_at_the_context_end(tiny):
    """Drafts past the context end are verified (their pages are held) but never emitted."""
    prompt = [256] + [65] * (TINY.max_position_embeddings - 6)
    want, _ = generate(tiny, [prompt], 0, 10, blocks=300)
    got, engine = generate(tiny, [prompt], 3, 10, blocks=300)
    assert got == want and len(got[0]) == 5 and engine.engine.stats.spec.verifications > 0


def test_penalties_and_logprobs_decode_without_drafts(tiny):
    """A request with a penalty or logprobs decodes one token a step (its tokens and logprobs as at K = 0)
    while a plain one beside it verifies drafts."""
    asks = {"pen": SamplingParams(frequency_penalty=0.7), "lp": SamplingParams(logprobs=2), "plain": SamplingParams()}
    results = {}
    for k in (0, 2):
        engine = LLMEngine(tiny, KVCacheConfig(block_size=4, num_blocks=128), 8, 64, num_draft_tokens=k)
        for rid, params in asks.items():
            engine.add_request(rid, PROMPTS[0], 8, params, ignore_eos=True)
        streams, lps = {}, {}
        while engine.has_work:
            for out in engine.step()[1]:
                streams.setdefault(out.request_id, []).extend(out.new_token_ids)
                lps.setdefault(out.request_id, []).extend(out.logprobs or [])
        results[k] = streams, lps, engine
    assert results[2][0] == results[0][0]
    assert [lp.token for lp in results[2][1]["lp"]] == results[2][0]["lp"]
    assert [(lp.token, round(lp.logprob, 5)) for lp in results[2][1]["lp"]] == \
        [(lp.token, round(lp.logprob, 5)) for lp in results[0][1]["lp"]]
    spec = results[2][2].stats.spec
    assert 0 < spec.verifications <= 7  # the plain request's only (the others never verify)


@pytest.mark.timeout(300)
def test_verification_steps_through_the_graph_runner(tiny):
    """decode_graphs with K = 2: verification steps take the static-buffer runner at 3 queries per sequence (the
    forward CUDA graphs capture; eager here, under Triton's interpreter), padded to a bucket; tokens as K = 0."""
    from moe_pd.model.ops import select_ops

    prompts = PROMPTS[:3]
    want, _ = generate(tiny, prompts, 0, 6)
    tiny.use_ops(select_ops("triton", torch.device("cpu")))
    try:
        # no DRAM tier: it would hold the reference run's pages, and a promoted sequence joins a step later
        engine = OfflineEngine(tiny, KVCacheConfig(block_size=4, num_blocks=64, host_tier_gib=0), 4,
                               num_draft_tokens=2, decode_graphs=True)
        runner = engine.engine.verify_graphs
        seen = []
        run = runner.run
        runner.run = lambda ids, batch: (seen.append(batch.num_seqs), run(ids, batch))[1]
        got = engine.generate(prompts, SamplingConfig(max_new_tokens=6, ignore_eos=True))
    finally:
        tiny.use_ops(None)
    assert [c.output_ids for c in got] == want
    assert seen and seen[0] == 3 and runner.queries == 3  # 3 sequences in the bucket of 4: one padding slot
    assert not runner.valid_B[9:12].any() and int(runner.seq_lens_B[3]) == 0
