"""KV transfer over ZeroMQ: the request's rows land in the reserved pages whatever the two page sizes; every
refusal is answered; malformed messages are dropped without harm. (Deadlines live in the requests' records:
tests/unit/test_disagg.py.)"""

import time

import pytest
import torch
import zmq

from moe_pd.kvcache.transfer.base import KVHeader, KVTarget, TransferState
from moe_pd.kvcache.transfer.zmq_transport import KVReceiver, KVSender

SHAPE = (3, 16, 4, 40)  # layers, pages, tokens per page, latent + rope width


@pytest.fixture
def ends():
    receiver_cache = torch.zeros(SHAPE)
    receiver = KVReceiver(receiver_cache)
    sender = KVSender("prefill0")
    yield sender, receiver, receiver_cache
    sender.close()
    receiver.close()


def header(rid, n, first_token=1, rng_state=b"", dtype="float32"):
    return KVHeader(rid, SHAPE[0], SHAPE[3], dtype, n, first_token, "prefill0", rng_state)


def send(sender, receiver, rid, cache, pages, n, **kw):
    return sender.send(receiver.target([], 30), cache, pages, header(rid, n, **kw))


def pump(sender, receiver, pages_for, seconds=5.0):
    """Runs both ends until the sender has an answer (single thread: each end polls in turn)."""
    deadline = time.monotonic() + seconds
    answers, arrivals = [], []
    while time.monotonic() < deadline and not answers:
        arrivals += receiver.poll(pages_for, timeout_ms=5)
        answers += sender.poll(timeout_ms=5)
    return answers, arrivals


def tokens(cache, pages, n):
    """The first n token rows of `pages`, in token order: [L, n, W]."""
    return cache[:, pages].reshape(cache.shape[0], -1, cache.shape[-1])[:, :n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("src_block,dst_block", [(4, 4), (4, 8), (8, 4)])
def test_rows_land_in_the_reserved_pages(dtype, src_block, dst_block):
    prefill_cache = torch.randn(SHAPE[0], 16, src_block, SHAPE[3]).to(dtype)
    receiver_cache = torch.zeros(SHAPE[0], 16, dst_block, SHAPE[3], dtype=dtype)
    receiver, sender = KVReceiver(receiver_cache), KVSender()
    src, dst, n = [0, 1, 7, 3][:-(-11 // src_block)], [9, 2, 5][:-(-11 // dst_block)], 11
    try:
        nbytes = send(sender, receiver, "r1", prefill_cache, src, n, first_token=42, rng_state=b"\x01\x02",
                      dtype=str(dtype).removeprefix("torch."))
        answers, arrivals = pump(sender, receiver, {"r1": dst}.get)
        assert [(a.request_id, a.state) for a in answers] == [("r1", TransferState.DONE)]
        (arrival,) = arrivals
        assert arrival.state is TransferState.DONE and arrival.nbytes == nbytes == 3 * n * 40 * dtype.itemsize
        assert (arrival.header.first_token, arrival.header.num_tokens, arrival.header.rng_state) == (42, 11, b"\1\2")
        assert torch.equal(tokens(receiver_cache, dst, n), tokens(prefill_cache, src, n))
        untouched = [p for p in range(16) if p not in dst]
        assert receiver_cache[:, untouched].abs().sum() == 0 and tokens(receiver_cache, dst, 12)[:, n:].abs().sum() == 0
    finally:
        sender.close()
        receiver.close()


def test_unexpected_request_is_rejected(ends):
    sender, receiver, cache = ends
    send(sender, receiver, "ghost", torch.ones(SHAPE), [0], 4)
    answers, arrivals = pump(sender, receiver, lambda rid: None)
    assert answers[0].state is TransferState.REJECTED and "no pages reserved" in answers[0].detail
    assert [(a.request_id, a.state) for a in arrivals] == [("ghost", TransferState.REJECTED)]
    assert cache.abs().sum() == 0


def test_kv_that_does_not_fit_is_rejected_and_reported_to_the_owner(ends):
    sender, receiver, cache = ends
    send(sender, receiver, "r2", torch.ones(SHAPE), [0, 1, 2], 12)  # 12 rows, 2 pages of 4 reserved
    answers, arrivals = pump(sender, receiver, {"r2": [1, 2]}.get)
    assert answers[0].state is TransferState.REJECTED and "does not fit 2 reserved pages" in answers[0].detail
    assert [(a.request_id, a.state) for a in arrivals] == [("r2", TransferState.REJECTED)]
    assert cache.abs().sum() == 0


def test_malformed_messages_are_dropped_and_the_receiver_carries_on(ends):
    sender, receiver, cache = ends
    rogue = zmq.Context.instance().socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(receiver.address)
    try:
        rogue.send_multipart([b"not a header", b"xx"])
        rogue.send(b"one frame")
        assert receiver.poll({"r4": [0]}.get, timeout_ms=100) == []
        send(sender, receiver, "r4", torch.ones(SHAPE), [5], 4)
        answers, arrivals = pump(sender, receiver, {"r4": [0]}.get)
        assert [a.state for a in answers] == [TransferState.DONE] and len(arrivals) == 1
        assert cache[:, 0].eq(1).all()
    finally:
        rogue.close(0)


def test_a_malformed_answer_is_dropped(ends):
    sender, _, _ = ends
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        sender.send(KVTarget("zmq", f"tcp://127.0.0.1:{port}", 30), torch.ones(SHAPE), [0], header("r6", 4))
        identity, _, _ = router.recv_multipart()
        router.send_multipart([identity, b"\xc1garbage"])
        assert sender.poll(timeout_ms=200) == []
    finally:
        router.close(0)
