"""The router's request flows against scripted instances (no processes): a failed KV transfer is re-run away
from the rank that failed, a lost instance's requests migrate with the tokens already streamed, requests wait
(bounded) for room, every abandoned attempt is aborted where it holds something, and what can not be re-run
fails with the right status. tests/dist/test_pd_faults.py and tests/dist/test_chaos.py run the same paths end
to end."""

from __future__ import annotations

import asyncio

import pytest

from moe_pd.config.serve import RouterConfig
from moe_pd.engine.core.request import Logprob, SamplingParams
from moe_pd.kvcache.transfer.base import KVTarget
from moe_pd.serve import protocol as p
from moe_pd.serve.backend import Chunk, Job, Stream
from moe_pd.serve.openai_api import APIError
from moe_pd.serve.router import ClusterBackend


class Fake:
    """An instance whose answers come from `script(instance, message) -> [(source, answer), ...]`."""

    def __init__(self, backend, address: str, role: str, free_pages: int = 100) -> None:
        self.backend, self.address, self.role, self.free_pages = backend, address, role, free_pages
        self.up, self.queued_tokens, self.block_size, self.draining, self.status = True, 0, 16, False, None
        self.status_at, self.refused_at, self.rank_room = 0.5, 0.0, 10**6
        self.sent: list[p.Message] = []
        self.script = lambda instance, msg: []

    def send(self, msg: p.Message) -> None:
        self.sent.append(msg)
        for source, answer in self.script(self, msg):
            asyncio.get_running_loop().call_soon(self.backend.requests.deliver, source, answer)

    def kinds(self) -> list[str]:
        return [f"{type(m).__name__}:{m.rid}" for m in self.sent]


MADE: list[ClusterBackend] = []


def make_backend(decodes: int = 2, **cfg):
    """A router whose instances are scripted fakes (its real clients connect to nothing and are closed)."""
    backend = ClusterBackend(RouterConfig(prefill=["tcp://127.0.0.1:9"], decode=["tcp://127.0.0.1:9"],
                                          request_timeout_s=5, **cfg))
    MADE.append(backend)
    prefill = Fake(backend, "tcp://p", "prefill")
    decode = [Fake(backend, f"tcp://d{i}", "decode", free_pages=100 - i) for i in range(decodes)]
    backend.prefill, backend.decode, backend.instances = [prefill], decode, [prefill, *decode]
    return backend, prefill, decode


def reserve_ok(instance, msg):
    target = KVTarget("zmq", f"kv-{instance.address}-{msg.rid}", 30.0)
    return [(instance, p.Reserved(msg.rid, target, 0))] if isinstance(msg, p.Reserve) else []


def prefill_then_tokens(decode_of, transfer="done", tokens=((7, False), (8, True))):
    """Prefill ships; the decode instance then streams `tokens` (when the transfer is done)."""
    def script(instance, msg):
        if not isinstance(msg, p.Prefill):
            return []
        decode = decode_of(msg)
        out = [(decode, p.Tokens(msg.rid, [t], done, "length" if done else None)) for t, done in tokens] \
            if transfer == "done" else []
        return out + [(instance, p.Prefilled(msg.rid, transfer, "" if transfer == "done" else "lost"))]
    return script


def run(backend, max_tokens: int = 2, params: SamplingParams = SamplingParams()) -> tuple[list, Exception | None]:
    job = Job([1, 2, 3], max_tokens, params)

    async def go():
        stream = Stream("cmpl-1", asyncio.get_running_loop())
        await backend._run(stream, job)
        items = []
        while not stream.tokens.empty():
            item = stream.tokens.get_nowait()[1]
            items.append(item if isinstance(item, Exception) else (item.ids, item.finished, item.reason))
        return items

    items = asyncio.run(go())
    errors = [i for i in items if isinstance(i, Exception)]
    assert backend.requests.attempts == {}  # every attempt ended
    return [i for i in items if not isinstance(i, Exception)], errors[0] if errors else None


def test_a_request_streams_and_leaves_nothing_behind():
    backend, prefill, (d0, d1) = make_backend()
    d0.script = reserve_ok
    prefill.script = prefill_then_tokens(lambda msg: d0)
    tokens, error = run(backend)
    assert error is None and tokens == [([7], False, None), ([8], True, "length")]
    assert d0.kinds() == ["Reserve:cmpl-1.0"] and prefill.kinds() == ["Prefill:cmpl-1.0"]
    assert prefill.sent[0].kv.address == "kv-tcp://d0-cmpl-1.0" and backend.metrics.retries._value.get() == 0


def test_a_failed_transfer_is_rerun_once_away_from_the_rank_that_failed():
    backend, prefill, (d0, d1) = make_backend()
    d0.script = reserve_ok
    attempts = iter(["timed_out", "done"])
    scripts = {}

    def prefill_script(instance, msg):
        scripts[msg.rid] = prefill_then_tokens(lambda m: d0, next(attempts))
        return scripts[msg.rid](instance, msg)

    prefill.script = prefill_script
    tokens, error = run(backend)
    assert error is None and [t for ids, _, _ in tokens for t in ids] == [7, 8]
    # the failed attempt's reservation is aborted; the re-run excludes the rank whose transfer failed
    assert d0.kinds() == ["Reserve:cmpl-1.0", "Abort:cmpl-1.0", "Reserve:cmpl-1.1"]
    assert d0.sent[2].exclude == ["kv-tcp://d0-cmpl-1.0"]
    assert backend.metrics.retries._value.get() == 1


def test_a_decode_side_transfer_failure_aborts_prefill_and_reruns():
    backend, prefill, (d0, d1) = make_backend()
    d0.script = reserve_ok
    failed = {"once": False}

    def prefill_script(instance, msg):
        if not failed["once"]:  # decode's reservation timed out before the KV came; prefill is still busy
            failed["once"] = True
            return [(d0, p.Error(msg.rid, "error: KV transfer timed_out", retry=True, status=503))]
        return prefill_then_tokens(lambda m: d0)(instance, msg)

    prefill.script = prefill_script
    tokens, error = run(backend)
    assert error is None and tokens[-1][1] is True
    assert prefill.kinds() == ["Prefill:cmpl-1.0", "Abort:cmpl-1.0", "Prefill:cmpl-1.1"]


def test_the_request_fails_with_a_503_after_its_migration_limit():
    backend, prefill, (d0, d1) = make_backend(migration_limit=1)
    d0.script = reserve_ok
    prefill.script = prefill_then_tokens(lambda msg: d0, "rejected")
    tokens, error = run(backend)
    assert tokens == [] and isinstance(error, APIError) and error.status == 503 and error.retry_after
    assert "KV transfer from prefill to decode rejected" in str(error) and backend.metrics.retries._value.get() == 2
    assert d0.kinds().count("Abort:cmpl-1.0") == 1 and d0.kinds().count("Abort:cmpl-1.1") == 1
    assert "tcp://" not in str(error) and "kv-" not in str(error)  # no internal details


def test_a_decode_failure_mid_stream_migrates_with_the_streamed_tokens():
    backend, prefill, (d0, d1) = make_backend()
    d0.script = reserve_ok

    def prefill_script(instance, msg):
        if msg.rid.endswith(".0"):  # the first decode rank streams one token, then fails
            return [(d0, p.Tokens(msg.rid, [7], False)), (d0, p.Error(msg.rid, "rank died", retry=True, status=503))]
        return prefill_then_tokens(lambda m: d0, tokens=((8, False), (9, True)))(instance, msg)

    prefill.script = prefill_script
    tokens, error = run(backend, max_tokens=4)
    assert error is None and [t for ids, _, _ in tokens for t in ids] == [7, 8, 9]
    again = [m for m in d0.sent if isinstance(m, p.Reserve)][1]
    assert again.rid == "cmpl-1.1" and again.prompt == [1, 2, 3, 7] and again.max_tokens == 3  # Dynamo's migration
    assert prefill.sent[-1].prompt == [1, 2, 3, 7]
    assert prefill.kinds()[:2] == ["Prefill:cmpl-1.0", "Abort:cmpl-1.0"]  # prefill still held the first


def test_a_full_decode_instance_sends_the_request_back_to_wait_and_another_takes_it():
    backend, prefill, (d0, d1) = make_backend()
    d0.script = lambda inst, msg: [(inst, p.Error(msg.rid, "no free pages", retry=True, status=503))] \
        if isinstance(msg, p.Reserve) else []
    d1.script = reserve_ok
    prefill.script = prefill_then_tokens(lambda msg: d1)
    tokens, error = run(backend)
    # the same attempt: refused for room, it waited (d0 is not tried again before its next heartbeat)
    assert error is None and d0.kinds() == ["Reserve:cmpl-1.0"] and d1.kinds() == ["Reserve:cmpl-1.0"]
    assert d1.sent[0].exclude == [] and backend.metrics.retries._value.get() == 0


def test_a_request_waits_for_room_then_runs():
    backend, prefill, (d0, d1) = make_backend()
    d0.script = reserve_ok
    prefill.script = prefill_then_tokens(lambda msg: d0)
    d0.rank_room = d1.rank_room = 0  # nobody has room ...

    async def room_later():
        await asyncio.sleep(0.3)
        d0.rank_room = 100  # ... until a heartbeat says d0 has

    async def go():
        asyncio.get_running_loop().create_task(room_later())
        return await asyncio.to_thread(lambda: None), await _run_async(backend)

    _, (tokens, error) = asyncio.run(go())
    assert error is None and tokens[-1][1] is True and d1.sent == []


def test_room_is_counted_in_each_decode_instances_own_page_size():
    """Prefill and decode may cut KV into pages of different sizes: 13 tokens (3 + 10) take 2 pages of 8 on d0
    and 1 page of 16 on d1, so d1 is picked although d0 has more free pages; the router's page size is
    prefill's."""
    backend, prefill, (d0, d1) = make_backend()
    prefill.block_size, d0.block_size, d1.block_size = 64, 8, 16
    d0.rank_room = d1.rank_room = 1
    d1.script = reserve_ok
    prefill.script = prefill_then_tokens(lambda msg: d1)
    tokens, error = run(backend, max_tokens=10)
    assert error is None and tokens[-1][1] is True and d0.sent == []
    assert backend.block_size == 64  # prefill's page size


async def _run_async(backend):
    stream = Stream(f"cmpl-w{len(backend.requests.tasks)}-{id(backend)}-{asyncio.get_running_loop().time()}",
                    asyncio.get_running_loop())
    await backend._run(stream, Job([1, 2, 3], 2))
    items = []
    while not stream.tokens.empty():
        items.append(stream.tokens.get_nowait()[1])
    return [(i.ids, i.finished, i.reason) for i in items if isinstance(i, Chunk)], \
        next((i for i in items if isinstance(i, Exception)), None)


def test_waiting_is_bounded_in_time_and_in_number():
    backend, prefill, (d0, d1) = make_backend(queue_timeout_s=0.2, max_waiting=1, retry_after_s=3)
    d0.rank_room = d1.rank_room = 0
    tokens, error = run(backend)
    assert error.status == 503 and error.retry_after == 3 and "within 0 s" in str(error)

    async def two():  # one waits; the second finds the queue full at once
        first = asyncio.create_task(_run_async(backend))
        await asyncio.sleep(0.05)
        return await _run_async(backend), await first

    (_, full), (_, timed_out) = asyncio.run(two())
    assert "too many requests are waiting" in str(full) and "within" in str(timed_out)


def test_a_request_no_rank_can_hold_fails_at_once_with_a_400():
    backend, prefill, (d0, d1) = make_backend()
    d0.script = lambda inst, msg: [(inst, p.Error(msg.rid, "needs 200 KV pages", retry=False, status=400))]
    tokens, error = run(backend)
    assert error.status == 400 and error.kind == "invalid_request_error" and prefill.sent == []


def test_a_prefill_instance_lost_before_shipping_is_rerun_on_any_rank():
    backend, prefill, (d0, d1) = make_backend()
    d0.script = reserve_ok
    lost = {"once": False}

    def prefill_script(instance, msg):
        if not lost["once"]:
            lost["once"] = True
            asyncio.get_running_loop().call_soon(backend.requests.instance_down, instance)
            return []
        return prefill_then_tokens(lambda m: d0)(instance, msg)

    prefill.script = prefill_script
    tokens, error = run(backend)
    assert error is None and d0.kinds() == ["Reserve:cmpl-1.0", "Abort:cmpl-1.0", "Reserve:cmpl-1.1"]
    assert d0.sent[2].exclude == []  # the decode rank did nothing wrong


def test_a_decode_instance_lost_migrates_to_another():
    backend, prefill, (d0, d1) = make_backend()
    d0.script = d1.script = reserve_ok

    def prefill_script(instance, msg):
        if msg.rid.endswith(".0"):
            d0.up = False
            asyncio.get_running_loop().call_soon(backend.requests.instance_down, d0)
            return []
        return prefill_then_tokens(lambda m: d1)(instance, msg)

    prefill.script = prefill_script
    tokens, error = run(backend)
    assert error is None and tokens[-1] == ([8], True, "length")
    assert prefill.kinds() == ["Prefill:cmpl-1.0", "Abort:cmpl-1.0", "Prefill:cmpl-1.1"]
    assert d1.kinds() == ["Reserve:cmpl-1.1"]


def test_logprobs_wait_for_prefill_which_sampled_the_first_token():
    backend, prefill, (d0, d1) = make_backend()
    d0.script = reserve_ok
    first, second = Logprob(7, -0.5), Logprob(8, -0.25)

    def prefill_script(instance, msg):  # decode's tokens arrive before prefill's report with token 7's logprob
        return [(d0, p.Tokens(msg.rid, [7], False, logprobs=[])),
                (d0, p.Tokens(msg.rid, [8], True, "length", [second])),
                (instance, p.Prefilled(msg.rid, "done", logprobs=[first], prompt_logprobs=[None, first]))]

    prefill.script = prefill_script

    async def go():
        stream = Stream("cmpl-l", asyncio.get_running_loop())
        await backend._run(stream, Job([1, 2, 3], 2, SamplingParams(logprobs=0, prompt_logprobs=0)))
        return [stream.tokens.get_nowait()[1] for _ in range(stream.tokens.qsize())]

    chunks = asyncio.run(go())
    assert [c.logprobs for c in chunks] == [[first], [second]]
    assert chunks[0].prompt_logprobs == [None, first] and chunks[1].prompt_logprobs is None
    assert d0.sent[0].params.prompt_logprobs is None  # decode never computes the prompt's


def test_a_draining_instance_gets_no_new_request():
    backend, prefill, (d0, d1) = make_backend()
    d0.draining = True
    d1.script = reserve_ok
    prefill.script = prefill_then_tokens(lambda msg: d1)
    tokens, error = run(backend)
    assert error is None and d0.sent == [] and d1.kinds() == ["Reserve:cmpl-1.0"]


def test_a_client_that_goes_away_aborts_every_holder():
    backend, prefill, (d0, d1) = make_backend()
    d0.script = reserve_ok
    async def go():
        stream = Stream("cmpl-9", asyncio.get_running_loop())
        backend.submit(stream, Job([1, 2, 3], 8))
        for _ in range(20):
            await asyncio.sleep(0)
        assert prefill.kinds() == ["Prefill:cmpl-9.0"]  # reserved, prefill running: both hold it
        backend.abort("cmpl-9")
        await asyncio.sleep(0.01)

    asyncio.run(go())
    assert d0.kinds()[-1] == "Abort:cmpl-9.0" and prefill.kinds()[-1] == "Abort:cmpl-9.0"
    assert backend.requests.attempts == {} and backend.requests.tasks == {}


@pytest.fixture(autouse=True)
def _close_sockets():
    yield
    while MADE:
        backend = MADE.pop()
        backend.context.destroy(linger=0)


def test_the_instance_client_drops_garbage_and_ignores_another_protocol_version():
    import msgspec
    import zmq
    import zmq.asyncio

    from moe_pd.serve.instance_client import InstanceClient

    async def go():
        context = zmq.asyncio.Context()
        leader = context.socket(zmq.ROUTER)
        leader.setsockopt(zmq.LINGER, 0)
        port = leader.bind_to_random_port("tcp://127.0.0.1")
        got = []
        client = InstanceClient(f"tcp://127.0.0.1:{port}", "decode", context, 5.0, lambda i, m: got.append(m),
                                lambda i: None)
        receiving = asyncio.create_task(client.receive())
        client.send(p.Hello(p.PROTOCOL_VERSION))
        identity, hello = await leader.recv_multipart()
        assert msgspec.msgpack.decode(hello, type=p.Hello).version == p.PROTOCOL_VERSION
        load = p.RankLoad(0, 1, 10, 0, 0, 0, 4)
        for raw in (b"\xc1", msgspec.msgpack.encode({"op": "nonsense"}),
                    p.encode(p.Status(p.PROTOCOL_VERSION + 1, "x", "decode", 16, [load])),  # another version
                    p.encode(p.Tokens("r.0", [5], False))):
            await leader.send_multipart([identity, raw])
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.01)
        assert got == [p.Tokens("r.0", [5], False)] and not client.up  # the other version's status was ignored
        await leader.send_multipart([identity, p.encode(p.Status(p.PROTOCOL_VERSION, "x", "decode", 16, [load]))])
        for _ in range(100):
            if client.up:
                break
            await asyncio.sleep(0.01)
        assert client.up and client.free_pages == 9
        receiving.cancel()
        client.socket.close(0)
        leader.close(0)
        context.term()

    asyncio.run(go())


def test_an_instance_failure_names_its_role_and_nothing_internal():
    backend, prefill, (d0, d1) = make_backend()
    d0.script = reserve_ok
    prefill.script = lambda inst, msg: [(inst, p.Error(msg.rid, "internal error", status=500))]
    tokens, error = run(backend)
    assert error.status == 500 and str(error) == "the prefill instance failed the request (internal error)"
    assert d0.kinds()[-1] == "Abort:cmpl-1.0"  # the decode reservation is freed
