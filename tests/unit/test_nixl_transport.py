"""NIXL transfer ends between two processes: real torch CPU pools over UCX TCP on loopback.

This process is one rank (pages of 4 tokens), a child process the other (pages of 16 tokens); each test is
bounded in time and the children are stopped by their own pid. Rows land exactly in the reserved pages both
ways; notices that do not match, unknown or malformed ones, bad descriptors, metadata that does not fit,
a write given up mid-way, a peer that dies mid-transfer on either side, the READ call of the KV tiers, and
the progress thread's pace. (The requests' states, deadlines and the fence: tests/unit/test_disagg.py and
test_request_lifecycle.py.)
"""

import os
import re
import time

import msgspec
import pytest
import torch

pytest.importorskip("nixl._api", reason="NIXL is installed by launch/setup_env.sh (pip install --no-deps)")

from helpers.nixl_peer import Peer, summary  # noqa: E402
from moe_pd.kvcache.transfer.base import KVHeader, TransferError  # noqa: E402
from moe_pd.kvcache.transfer.nixl_agent import UCX_ONE_HOST_CPU, NixlAgent, PeerInfo, encode  # noqa: E402
from moe_pd.kvcache.transfer.nixl_transport import NixlReader, NixlReceiver, NixlSender  # noqa: E402

pytestmark = pytest.mark.timeout(120)
LAYERS, WIDTH, DTYPE = 3, 2048, torch.bfloat16
HERE_BLOCK, HERE_PAGES = 4, 4096  # 16384 tokens: a whole-pool transfer is ~200 MB, long enough to interrupt
PEER_SHAPE = (LAYERS, 1024, 16, WIDTH)
WHOLE = list(range(HERE_PAGES)), list(range(PEER_SHAPE[1])), HERE_PAGES * HERE_BLOCK


class Here:
    def __init__(self) -> None:
        self.pool = torch.zeros(LAYERS, HERE_PAGES, HERE_BLOCK, WIDTH, dtype=DTYPE)
        self.agent = NixlAgent("here", self.pool, UCX_ONE_HOST_CPU)
        self.sender, self.receiver = NixlSender(self.agent), NixlReceiver(self.agent, fence_s=1.0)
        self.reader = NixlReader(self.agent)

    def pump(self, seconds=10.0, until=1, pages=None):
        events, deadline = [], time.monotonic() + seconds
        while time.monotonic() < deadline and len(events) < until:
            events += summary(self.sender, self.receiver, self.reader, pages)
            time.sleep(0.005)
        return events


@pytest.fixture(scope="module")
def here():
    h = Here()
    yield h
    h.agent.close()


@pytest.fixture(scope="module")
def peer(here):
    p = Peer(PEER_SHAPE, DTYPE)
    yield p
    p.stop()


def header(rid, n, first_token=42):
    return KVHeader(rid, LAYERS, WIDTH, "bfloat16", n, first_token)


def tokens(pool_LPSW, pages, n):
    """The first n token rows of `pages`, in token order: [L, n, W]."""
    return pool_LPSW[:, pages].reshape(pool_LPSW.shape[0], -1, pool_LPSW.shape[-1])[:, :n]


def test_rows_land_in_the_reserved_pages_of_a_larger_page_size(here, peer):
    src, dst = [5, 9, 2, 7], [3, 0, 8]
    here.pool[:, src] = torch.randn(LAYERS, len(src), HERE_BLOCK, WIDTH).to(DTYPE)
    target = peer.call("target", dst, 5.0)
    assert target.backend == "nixl" and target.pages == dst and target.address == "nixl://" + peer.name
    nbytes = here.sender.send(target, here.pool, src, header("r1", 14), time.monotonic() + 10)
    assert nbytes == 14 * LAYERS * WIDTH * 2
    assert here.pump() == [("sent", "r1", "done", "")]
    assert peer.call("poll_for", 10.0, 1, {"r1": dst}) == [("arrival", "r1", "done", "", True, (14, 42))]
    landed = peer.call("pages", [3, 0])
    assert torch.equal(tokens(landed, [0, 1], 14), tokens(here.pool, src, 14))
    assert tokens(landed, [0, 1], 32)[:, 14:].abs().sum() == 0  # rows past the request stay untouched
    assert peer.call("pages", [8]).abs().sum() == 0


def test_rows_land_in_the_reserved_pages_of_a_smaller_page_size(here, peer):
    values = torch.randn(LAYERS, 1, 16, WIDTH).to(DTYPE)
    peer.call("set_pages", [6], values)
    dst = [40, 11, 12, 30]
    assert peer.call("send", here.receiver.target(dst, 5.0), [6], header("r2", 13, 7), 10.0) == 13 * LAYERS * WIDTH * 2
    assert peer.call("poll_for", 10.0) == [("sent", "r2", "done", "")]
    assert here.pump(pages={"r2": dst}) == [("arrival", "r2", "done", "", True, (13, 7))]
    assert torch.equal(tokens(here.pool, dst, 13), tokens(values, [0], 13))


def test_a_notice_for_other_pages_or_no_reservation_is_refused(here, peer):
    here.sender.send(peer.call("target", [6], 5.0), here.pool, [0], header("r3", 4), time.monotonic() + 10)
    here.sender.send(peer.call("target", [7], 5.0), here.pool, [0], header("ghost", 4), time.monotonic() + 10)
    assert [e[:3] for e in here.pump(until=2)] == [("sent", "r3", "done"), ("sent", "ghost", "done")]
    arrivals = peer.call("poll_for", 10.0, 2, {"r3": [5]})  # r3 reserved page 5, wrote 6; ghost: not reserved
    assert [(e[1], e[2], e[3], e[4]) for e in arrivals] == [
        ("r3", "rejected", "the written pages are not the reserved ones", True),
        ("ghost", "rejected", "no pages reserved for this request", True)]
    assert peer.call("counters")["unexpected_notices"] == 1


@pytest.mark.parametrize("src,dst,n,deadline,reason", [
    ([0], [2000], 4, 10, "bad descriptors: destination page ids must lie in [0, 1024)"),
    ([1], [7], 10, 10, "bad descriptors: source pages hold 4 tokens, 10 needed"),
    ([1], [7], 4, -1, "the reservation expired before the write"),
])
def test_a_write_that_cannot_start_raises_and_the_peer_learns_nothing_was_posted(here, peer, src, dst, n, deadline,
                                                                                 reason):
    target = peer.call("target", dst, 30.0)
    with pytest.raises(TransferError, match=re.escape(reason)):
        here.sender.send(target, here.pool, src, header("r6", n), time.monotonic() + deadline)
    assert not here.agent.handles
    here.sender.cancel("r6", target, False, reason)
    [arrival] = peer.call("poll_for", 10.0, 1, {"r6": dst})
    assert arrival[:5] == ("arrival", "r6", "failed", f"the sender gave up: {reason}", True)  # quiet: reuse now


def test_malformed_notices_are_counted_and_dropped(here, peer):
    here.agent.agent.send_notif(peer.name, b"not a moe_pd notice")
    deadline = time.monotonic() + 10
    while peer.call("counters").get("malformed_notices", 0) == 0 and time.monotonic() < deadline:
        assert peer.call("poll_for", 0.05) == []
    assert peer.call("counters")["malformed_notices"] == 1


def test_metadata_that_does_not_fit_is_refused(here, peer):
    raw = peer.call("metadata")
    info = msgspec.msgpack.decode(raw, type=PeerInfo)
    other = msgspec.structs.replace(info, layout=msgspec.structs.replace(info.layout, num_layers=LAYERS + 1))
    with pytest.raises(ValueError, match="num_layers differs"):
        here.agent.add_peer(encode(other))
    with pytest.raises(ValueError, match="protocol"):
        here.agent.add_peer(encode(msgspec.structs.replace(info, version=99)))
    target = msgspec.structs.replace(peer.call("target", [0], 5.0), peer=b"\x00garbage")
    with pytest.raises(TransferError, match="malformed NIXL peer metadata"):
        here.sender.send(target, here.pool, [0], header("r7", 4), time.monotonic() + 10)


def test_a_write_given_up_mid_way_releases_the_source_and_tells_the_target_it_may_still_land(here, peer):
    """The request's deadline or an abort: the handle is released at once (the source pages are the
    caller's again), and the target hears Abandoned(posted): not quiet, its pages stay fenced."""
    src, dst, n = WHOLE
    target = peer.call("target", dst, 30.0)
    here.sender.send(target, here.pool, src, header("r8", n), time.monotonic() + 30)
    here.sender.cancel("r8", target, True, "aborted")
    assert not here.agent.handles and here.pump(seconds=0.5) == []  # no completion is reported for it
    events = peer.call("poll_for", 10.0, 1, {"r8": dst})
    # Best effort: UCX may cancel the notice with the write it follows; when it arrives it is not quiet.
    assert events in ([], [("arrival", "r8", "failed", "the sender gave up: aborted", False, None)])


def test_the_target_dying_mid_transfer_fails_the_write_and_later_ones(here):
    doomed = Peer(PEER_SHAPE, DTYPE)
    try:
        src, dst, n = WHOLE
        target = doomed.call("target", dst, 30.0)
        here.sender.send(target, here.pool, src, header("r9", n), time.monotonic() + 30)
        doomed.kill()
        [(kind, rid, state, detail)] = here.pump(20)
        assert (kind, rid, state) == ("sent", "r9", "failed") and "Disconnect" in detail, detail
        try:
            here.sender.send(target, here.pool, [0], header("r10", 4), time.monotonic() + 5)
            [event] = here.pump(10)
            assert event[:3] == ("sent", "r10", "failed")
        except TransferError as exc:  # or NIXL refuses it at once
            assert "refused" in str(exc) or "posting failed" in str(exc)
    finally:
        doomed.kill()


def test_the_sender_dying_mid_transfer_sends_no_notice(here):
    """Nothing tells the target: its reservation ends at its deadline and stays fenced (the table's job)."""
    doomed = Peer(PEER_SHAPE, DTYPE)
    try:
        src, dst, n = WHOLE
        doomed.call("send", here.receiver.target(src, 30.0), dst, header("r11", n), 30.0)
        doomed.kill()
        assert here.pump(seconds=2, pages={"r11": src}) == []
    finally:
        doomed.kill()


def test_read_pulls_a_peers_pages_and_the_owner_hears_when_it_ended(here, peer):
    values = torch.randn(LAYERS, 2, 16, WIDTH).to(DTYPE)
    peer.call("set_pages", [2, 9], values)
    local = list(range(100, 108))
    nbytes = here.reader.read("f1", peer.call("metadata"), [2, 9], local, 29)
    assert nbytes == 29 * LAYERS * WIDTH * 2
    assert here.pump() == [("read", "f1", "done", "")]
    assert torch.equal(tokens(here.pool, local, 29), tokens(values, [0, 1], 29))
    assert peer.call("poll_for", 10.0) == [("served", "f1")]
    with pytest.raises(TransferError, match="bad descriptors"):
        here.reader.read("f2", peer.call("metadata"), [5000], local, 4)


def test_the_progress_thread_sleeps_by_what_is_going_on(here):
    agent, now = here.agent, time.monotonic()
    assert not agent.handles and not agent.flowing
    agent.wait_until = 0.0
    assert agent.interval(now) == agent.idle_s
    agent.expect_until(now + 1.0)
    assert agent.interval(now) == agent.wait_s
    agent.flowing["x"] = now + 1.0
    assert agent.interval(now) == agent.busy_s
    del agent.flowing["x"]
    agent.wait_until = 0.0


def test_an_agent_waiting_for_transfers_costs_little_cpu(here):
    """A decode rank holds reservations most of the time: polling then every wait_s (5 ms) must stay cheap
    next to the 1 ms busy pace (measured in this process: the main thread sleeps)."""
    def cpu_share(seconds=1.0):
        start, cpu = time.monotonic(), os.times()
        time.sleep(seconds)
        used = os.times()
        return (used.user + used.system - cpu.user - cpu.system) / (time.monotonic() - start)

    here.agent.expect_until(time.monotonic() + 5)
    waiting = cpu_share()
    here.agent.flowing["busy"] = time.monotonic() + 5
    busy = cpu_share()
    del here.agent.flowing["busy"]
    here.agent.wait_until = 0.0
    print(f"CPU share: waiting {waiting:.3f}, busy {busy:.3f}")
    assert waiting < 0.05 and waiting < busy
