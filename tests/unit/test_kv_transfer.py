"""KV transfer over ZeroMQ: latents land in the reserved pages; every refusal is answered; malformed messages
are dropped without harm. (Deadlines live in the requests' records: tests/unit/test_disagg.py.)"""

import time

import pytest
import torch
import zmq

from moe_pd.kvcache.transfer.base import TransferState
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


def pump(sender, receiver, pages_for, seconds=5.0):
    """Runs both ends until the sender has an answer (single thread: each end polls in turn)."""
    deadline = time.monotonic() + seconds
    answers, arrivals = [], []
    while time.monotonic() < deadline and not answers:
        arrivals += receiver.poll(pages_for, timeout_ms=5)
        answers += sender.poll(timeout_ms=5)
    return answers, arrivals


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latents_land_in_the_reserved_pages(dtype):
    prefill_cache = torch.randn(SHAPE).to(dtype)
    receiver_cache = torch.zeros(SHAPE, dtype=dtype)
    receiver, sender = KVReceiver(receiver_cache), KVSender()
    try:
        nbytes = sender.send("r1", receiver.address, prefill_cache, [0, 1, 7], num_tokens=11, first_token=42,
                             rng_state=b"\x01\x02")
        answers, arrivals = pump(sender, receiver, {"r1": [9, 2, 5]}.get)
        assert [(a.request_id, a.state) for a in answers] == [("r1", TransferState.DONE)]
        (arrival,) = arrivals
        assert arrival.state is TransferState.DONE and arrival.nbytes == nbytes == 3 * 3 * 4 * 40 * dtype.itemsize
        assert (arrival.header.first_token, arrival.header.num_tokens, arrival.header.rng_state) == (42, 11, b"\1\2")
        assert torch.equal(receiver_cache[:, [9, 2, 5]], prefill_cache[:, [0, 1, 7]])
        assert receiver_cache[:, [0, 1, 3]].abs().sum() == 0  # nothing else was touched
    finally:
        sender.close()
        receiver.close()


def test_unexpected_request_is_rejected(ends):
    sender, receiver, cache = ends
    sender.send("ghost", receiver.address, torch.ones(SHAPE), [0], 4, 1)
    answers, arrivals = pump(sender, receiver, lambda rid: None)
    assert answers[0].state is TransferState.REJECTED and "no pages reserved" in answers[0].detail
    assert arrivals == [] and cache.abs().sum() == 0


def test_mismatched_shape_is_rejected_and_reported_to_the_owner(ends):
    sender, receiver, cache = ends
    sender.send("r2", receiver.address, torch.ones(SHAPE), [0, 1, 2], 12, 1)  # 3 pages, 2 reserved
    answers, arrivals = pump(sender, receiver, {"r2": [1, 2]}.get)
    assert answers[0].state is TransferState.REJECTED and "does not fit" in answers[0].detail
    assert [(a.request_id, a.state) for a in arrivals] == [("r2", TransferState.REJECTED)]
    assert cache.abs().sum() == 0


def test_a_dropped_send_never_reaches_the_receiver(ends):
    sender, receiver, cache = ends
    nbytes = sender.send("r3", receiver.address, torch.ones(SHAPE), [0], 4, 1, drop=True)
    assert nbytes > 0 and receiver.poll({"r3": [0]}.get, timeout_ms=50) == [] and cache.abs().sum() == 0


def test_malformed_messages_are_dropped_and_the_receiver_carries_on(ends):
    sender, receiver, cache = ends
    rogue = zmq.Context.instance().socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(receiver.address)
    try:
        rogue.send_multipart([b"not a header", b"xx"])
        rogue.send(b"one frame")
        assert receiver.poll({"r4": [0]}.get, timeout_ms=100) == []
        sender.send("r4", receiver.address, torch.ones(SHAPE), [5], 4, 1)
        answers, arrivals = pump(sender, receiver, {"r4": [0]}.get)
        assert [a.state for a in answers] == [TransferState.DONE] and len(arrivals) == 1
        assert cache[:, 0].eq(1).all()
    finally:
        rogue.close(0)


def test_a_malformed_answer_is_dropped(ends):
    sender, receiver, _ = ends
    sender.send("r5", receiver.address, torch.ones(SHAPE), [0], 4, 1, drop=True)  # opens the socket
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        sender.send("r6", f"tcp://127.0.0.1:{port}", torch.ones(SHAPE), [0], 4, 1)
        identity, _, _ = router.recv_multipart()
        router.send_multipart([identity, b"\xc1garbage"])
        assert sender.poll(timeout_ms=200) == []
    finally:
        router.close(0)
