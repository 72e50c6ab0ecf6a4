"""NIXL engine between two processes: real torch CPU pools over UCX TCP on loopback.

This process is one rank (pages of 4 tokens), a child process the other (pages of 16 tokens); each test
is bounded in time and the children are stopped by their own pid. Faults: bad descriptors, an expired
reservation, a timeout, cancellation on either side, late, unknown and malformed notices, and a peer that
dies mid-transfer on either side.
"""

import time

import msgspec
import pytest
import torch

pytest.importorskip("nixl._api", reason="NIXL is installed by launch/setup_env.sh (pip install --no-deps)")

from helpers.nixl_peer import Peer  # noqa: E402
from moe_pd.kvcache.transfer.nixl_agent import UCX_ONE_HOST_CPU, PeerInfo, encode  # noqa: E402
from moe_pd.kvcache.transfer.nixl_engine import NixlEngine, XferState  # noqa: E402

pytestmark = pytest.mark.timeout(120)
LAYERS, WIDTH, DTYPE = 3, 2048, torch.bfloat16
HERE_BLOCK, HERE_PAGES = 4, 4096  # 16384 tokens: a whole-pool transfer is ~200 MB, long enough to interrupt
PEER_SHAPE = (LAYERS, 1024, 16, WIDTH)
FENCE_S = 0.5


@pytest.fixture(scope="module")
def engine():
    pool = torch.zeros(LAYERS, HERE_PAGES, HERE_BLOCK, WIDTH, dtype=DTYPE)
    eng = NixlEngine("here", pool, UCX_ONE_HOST_CPU, fence_s=FENCE_S)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def peer(engine):
    p = Peer(PEER_SHAPE, DTYPE, fence_s=FENCE_S)
    try:
        p.call("add_peer", engine.metadata())
        engine.add_peer(p.call("metadata"))
        yield p
    finally:
        p.stop()


def pump(engine, seconds=10.0, until=lambda events: bool(events)):
    events, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline and not until(events):
        progress = engine.poll()
        events += [("write", w) for w in progress.writes] + [("arrival", a) for a in progress.arrivals]
        events += [("reclaimed", a) for a in progress.reclaimed]
        time.sleep(0.005)
    return events


def tokens(pool_LPSW, pages, n):
    """The first n token rows of `pages`, in token order: [L, n, W]."""
    return pool_LPSW[:, pages].reshape(pool_LPSW.shape[0], -1, pool_LPSW.shape[-1])[:, :n]


def test_rows_land_in_the_reserved_pages_of_a_larger_page_size(engine, peer):
    src = [5, 9, 2, 7]
    engine.agent.kv_LPSW[:, src] = torch.randn(LAYERS, len(src), HERE_BLOCK, WIDTH).to(DTYPE)
    assert peer.call("expect", "r1", [3, 0, 8], 5.0) == "pending"
    write = engine.write("r1", peer.name, src, [3, 0, 8], 14, b"first-token=42", timeout_s=10)
    assert write.state is XferState.PENDING and write.nbytes == 14 * LAYERS * WIDTH * 2
    assert write.num_descs == LAYERS * 4  # four source pages, each inside one destination page
    [(kind, done)] = pump(engine)
    assert kind == "write" and done is write and write.state is XferState.DONE, write.detail
    [arrival] = peer.call("poll_for", 10.0)
    assert arrival[:3] == ("arrival", "r1", "done") and arrival[4:] == (14, b"first-token=42")
    landed = peer.call("pages", [3, 0])
    assert torch.equal(tokens(landed, [0, 1], 14), tokens(engine.agent.kv_LPSW, src, 14))
    assert tokens(landed, [0, 1], 32)[:, 14:].abs().sum() == 0  # rows past the request stay untouched
    assert peer.call("pages", [8]).abs().sum() == 0


def test_rows_land_in_the_reserved_pages_of_a_smaller_page_size(engine, peer):
    values = torch.randn(LAYERS, 1, 16, WIDTH).to(DTYPE)
    peer.call("set_pages", [6], values)
    arrival = engine.expect("r2", [40, 11, 12, 30], timeout_s=5)
    assert peer.call("write", "r2", engine.name, [6], [40, 11, 12, 30], 13, b"", 10.0) == "pending"
    assert peer.call("poll_for", 10.0)[0][:3] == ("write", "r2", "done")
    [(kind, got)] = pump(engine)
    assert kind == "arrival" and got is arrival and arrival.state is XferState.DONE and arrival.num_tokens == 13
    assert torch.equal(tokens(engine.agent.kv_LPSW, [40, 11, 12, 30], 13), tokens(values, [0], 13))


def test_a_reservation_times_out_and_its_pages_come_back_after_the_fence(peer):
    start = time.monotonic()
    peer.call("expect", "r3", [4], 0.2)
    events = peer.call("poll_for", 10.0, 2)
    assert [e[:3] for e in events] == [("arrival", "r3", "timed_out"), ("reclaimed", "r3", "timed_out")]
    assert time.monotonic() - start >= 0.2 + FENCE_S


def test_a_cancelled_reservation_is_reclaimed_when_the_late_write_ends(engine, peer):
    peer.call("expect", "r4", [5], 30.0)
    assert peer.call("cancel_arrival", "r4") == "cancelled"
    engine.write("r4", peer.name, [0], [5], 4, b"", timeout_s=10)
    assert pump(engine)[0][1].state is XferState.DONE
    assert peer.call("poll_for", 10.0) == [("reclaimed", "r4", "cancelled")]  # long before the 30 s deadline
    assert peer.call("counters")["late_notices"] == 1


def test_unknown_and_malformed_notices_are_counted_and_dropped(engine, peer):
    engine.write("ghost", peer.name, [0], [6], 4, b"", timeout_s=10)
    assert pump(engine)[0][1].state is XferState.DONE
    engine.agent.agent.send_notif(peer.name, b"not a moe_pd notice")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert peer.call("poll_for", 0.05) == []
        counters = peer.call("counters")
        if counters["unknown_notices"] and counters["malformed_notices"]:
            break
    assert counters["unknown_notices"] == 1 and counters["malformed_notices"] == 1


@pytest.mark.parametrize("src,dst,n,not_after,reason", [
    ([0], [2000], 4, None, "bad descriptors: destination page ids must lie in [0, 1024)"),
    ([1], [7], 10, None, "bad descriptors: source pages hold 4 tokens, 10 needed"),
    ([1], [7], 4, -1.0, "the reservation expired before the write"),
])
def test_a_refused_write_fails_and_the_peer_reclaims_at_once(engine, peer, src, dst, n, not_after, reason):
    peer.call("expect", "r6", [7], 30.0)
    write = engine.write("r6", peer.name, src, dst, n, b"", 10, None if not_after is None else time.monotonic() - 1)
    assert write.state is XferState.FAILED and write.detail.startswith(reason)
    events = peer.call("poll_for", 10.0, 2)
    assert [e[:3] for e in events] == [("arrival", "r6", "failed"), ("reclaimed", "r6", "failed")]
    assert reason in events[0][3]


def test_metadata_that_does_not_fit_is_refused(engine, peer):
    info = msgspec.msgpack.decode(peer.call("metadata"), type=PeerInfo)
    other = msgspec.structs.replace(info, layout=msgspec.structs.replace(info.layout, num_layers=LAYERS + 1))
    with pytest.raises(ValueError, match="num_layers differs"):
        engine.add_peer(encode(other))
    with pytest.raises(ValueError, match="protocol"):
        engine.add_peer(encode(msgspec.structs.replace(info, version=99)))
    with pytest.raises(ValueError, match="malformed"):
        engine.add_peer(b"\x00garbage")
    assert engine.write("r7", "nobody", [0], [0], 4, b"", 1).detail.startswith("unknown peer")


WHOLE = list(range(HERE_PAGES)), list(range(PEER_SHAPE[1])), HERE_PAGES * HERE_BLOCK


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_an_interrupted_write_frees_the_source_and_fences_the_target(engine, peer, how):
    """An aborted UCX write keeps landing for a while (about 2 s for this one, measured), so the target
    reclaims its pages only after the fence, whether the sender's notice or the deadline ends it first."""
    src, dst, n = WHOLE
    start = time.monotonic()
    peer.call("expect", f"r8{how}", dst, 0.6)
    write = engine.write(f"r8{how}", peer.name, src, dst, n, b"", timeout_s=0.001 if how == "timeout" else 10)
    assert write.state is XferState.PENDING
    if how == "cancel":
        assert engine.cancel_write(write.transfer_id) is write and write.state is XferState.CANCELLED
    else:
        time.sleep(0.01)
        assert [w for _, w in pump(engine)] == [write] and write.state is XferState.TIMED_OUT
    assert not engine.agent.handles  # released: the source pages are the caller's again
    events = peer.call("poll_for", 10.0, 2)
    assert [e[0] for e in events] == ["arrival", "reclaimed"] and events[0][2] in ("failed", "timed_out")
    assert time.monotonic() - start >= 0.6 + FENCE_S


def test_the_target_dying_mid_transfer_fails_the_write(engine):
    doomed = Peer(PEER_SHAPE, DTYPE)
    try:
        engine.add_peer(doomed.call("metadata"))
        src, dst, n = WHOLE
        write = engine.write("r9", doomed.name, src, dst, n, b"", timeout_s=30)
        doomed.kill()
        pump(engine, 20)
        assert write.state is XferState.FAILED and "Disconnect" in write.detail, write.detail
        again = engine.write("r10", doomed.name, [0], [0], 4, b"", timeout_s=5)
        pump(engine, 10, until=lambda _: again.state is not XferState.PENDING)
        assert again.state is XferState.FAILED
    finally:
        doomed.kill()


def test_the_sender_dying_mid_transfer_times_out_and_fences_the_pages(engine):
    doomed = Peer(PEER_SHAPE, DTYPE)
    try:
        doomed.call("add_peer", engine.metadata())
        src, dst, n = WHOLE
        arrival = engine.expect("r11", src, timeout_s=0.6)
        start = time.monotonic()
        doomed.call("write", "r11", engine.name, dst, src, n, b"", 30.0)
        doomed.kill()
        events = pump(engine, 10, until=lambda ev: len(ev) == 2)
        assert [(kind, a.state) for kind, a in events] == [("arrival", XferState.TIMED_OUT),
                                                            ("reclaimed", XferState.TIMED_OUT)]
        assert events[0][1] is arrival and time.monotonic() - start >= 0.6 + FENCE_S - 0.05
    finally:
        doomed.kill()
