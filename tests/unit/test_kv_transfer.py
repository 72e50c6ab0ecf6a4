"""KV transfer over ZeroMQ: latents land in the reserved pages; every failure is a final state."""

import time

import pytest
import torch

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


def pump(sender, receiver, seconds=5.0):
    """Runs both ends until the sender has an answer (single thread: each end polls in turn)."""
    deadline = time.monotonic() + seconds
    got_s, got_r = [], []
    while time.monotonic() < deadline and not got_s:
        got_r += receiver.poll(timeout_ms=5)
        got_s += sender.poll(timeout_ms=5)
    return got_s, got_r


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latents_land_in_the_reserved_pages(dtype):
    prefill_cache = torch.randn(SHAPE).to(dtype)
    receiver_cache = torch.zeros(SHAPE, dtype=dtype)
    receiver, sender = KVReceiver(receiver_cache), KVSender()
    try:
        reservation = receiver.expect("r1", [9, 2, 5], timeout_s=5)
        transfer = sender.send("r1", receiver.address, prefill_cache, [0, 1, 7], num_tokens=11, first_token=42,
                               timeout_s=5)
        sent, received = pump(sender, receiver)
        assert [t.state for t in sent] == [TransferState.DONE] and transfer.state is TransferState.DONE
        assert received == [reservation] and reservation.first_token == 42 and reservation.num_tokens == 11
        assert torch.equal(receiver_cache[:, [9, 2, 5]], prefill_cache[:, [0, 1, 7]])
        assert receiver_cache[:, [0, 1, 3]].abs().sum() == 0  # nothing else was touched
        assert transfer.nbytes == 3 * 3 * 4 * 40 * prefill_cache.element_size()
    finally:
        sender.close()
        receiver.close()


def test_unreserved_request_is_rejected(ends):
    sender, receiver, _ = ends
    sender.send("ghost", receiver.address, torch.zeros(SHAPE), [0], 4, 1, timeout_s=5)
    sent, received = pump(sender, receiver)
    assert sent[0].state is TransferState.REJECTED and "no pages reserved" in sent[0].detail
    assert received == []


def test_mismatched_shape_is_rejected_and_the_reservation_ends(ends):
    sender, receiver, cache = ends
    reservation = receiver.expect("r2", [1, 2], timeout_s=5)
    sender.send("r2", receiver.address, torch.zeros(SHAPE), [0, 1, 2], 12, 1, timeout_s=5)  # 3 pages, not 2
    sent, received = pump(sender, receiver)
    assert sent[0].state is TransferState.REJECTED and "does not fit" in sent[0].detail
    assert reservation.state is TransferState.REJECTED and received == [reservation]


def test_receiver_times_out_when_nothing_arrives(ends):
    _, receiver, _ = ends
    reservation = receiver.expect("late", [3], timeout_s=0.05)
    time.sleep(0.1)
    assert receiver.poll() == [reservation] and reservation.state is TransferState.TIMED_OUT
    assert "late" not in receiver.expected


def test_sender_times_out_without_an_answer():
    sender = KVSender()
    try:
        transfer = sender.send("r3", "tcp://127.0.0.1:9", torch.zeros(SHAPE), [0], 4, 1, timeout_s=0.1)
        done = sender.poll(timeout_ms=1000)
        assert done == [transfer] and transfer.state is TransferState.TIMED_OUT
    finally:
        sender.close()


def test_aborted_request_never_reaches_decode(ends):
    sender, receiver, cache = ends
    receiver.expect("r4", [0], timeout_s=5)
    sender.cancel("r4")
    transfer = sender.send("r4", receiver.address, torch.ones(SHAPE), [0], 4, 1, timeout_s=5)
    assert transfer.state is TransferState.CANCELLED
    assert receiver.poll(timeout_ms=50) == [] and cache.abs().sum() == 0
