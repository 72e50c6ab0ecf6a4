"""An instance leader's decisions on plain messages: which rank gets each request, what it refuses, and what
it does with messages that are broken or not for it."""

import msgspec
import pytest
import zmq

from moe_pd.config.serve import ServiceConfig
from moe_pd.kvcache.transfer.base import KVTarget
from moe_pd.serve import protocol as p
from moe_pd.serve.leader import Leader, RouteState

KV = KVTarget("zmq", "tcp://d0", 30.0)


class Router:
    """The router's end of a leader's socket: sends requests, keeps the leader's answers."""

    def __init__(self, address: str) -> None:
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.answers: list = []

    def receive(self) -> None:
        while self.socket.poll(0):
            self.answers.append(msgspec.msgpack.decode(self.socket.recv(), type=p.LeaderMessage))

    def take_answers(self, at_least: int = 0) -> list:
        for _ in range(100):
            self.receive()
            if len(self.answers) >= at_least:
                break
            self.socket.poll(10)
        out, self.answers = self.answers, []
        return out


@pytest.fixture
def leader_and_client():
    made = []

    def make(role, loads, block_size=4):
        leader = Leader(ServiceConfig(role=role, port=0), len(loads), f"{role}-test", block_size, max_context=1024)
        leader.loads = loads
        made.append((leader, Router(leader.address)))
        return made[-1]

    yield make
    for leader, router in made:
        router.socket.close(0)
        leader.close()


def exchange(leader, router, *messages, expect=None):
    """Sends the messages (structs, or raw bytes); returns the commands per rank once `expect` (default: one
    per message) commands and answers came back."""
    for msg in messages:
        router.socket.send(msg if isinstance(msg, bytes) else p.encode(msg))
    commands = {}
    for _ in range(50):
        for rank, cmds in leader.collect(wait_ms=20).items():
            commands.setdefault(rank, []).extend(cmds)
        router.receive()
        if sum(map(len, commands.values())) + len(router.answers) >= (len(messages) if expect is None else expect):
            break
    return commands


def decode_load(rank, used=0, total=100, running=0, address=""):
    return p.RankLoad(rank, used, total, running, 0, 0, 64, address or f"tcp://d{rank}")


def reserve(rid, exclude=(), prompt=(1, 2, 3), max_tokens=4):
    """3 + 4 tokens: 2 pages of 4 tokens."""
    return p.Reserve(rid, list(prompt), max_tokens, exclude=list(exclude))


def test_decode_goes_to_the_least_loaded_rank_and_respects_the_exclusion(leader_and_client):
    leader, client = leader_and_client("decode", [decode_load(0, used=50), decode_load(1, used=10)])
    assert exchange(leader, client, reserve("a")) == {1: [reserve("a")]}
    # a re-run after rank 1's transfer failed avoids rank 1
    assert exchange(leader, client, reserve("b", exclude=["tcp://d1"])) == {0: [reserve("b", ["tcp://d1"])]}
    assert leader.routes.get("a").rank == 1 and leader.routes.get("b").state is RouteState.ASSIGNED


def test_a_burst_is_spread_because_each_choice_counts_against_its_rank(leader_and_client):
    leader, client = leader_and_client("decode", [decode_load(0), decode_load(1)])
    commands = exchange(leader, client, reserve("a", max_tokens=117), reserve("b", max_tokens=117))  # 30 pages
    assert sorted(len(c) for c in commands.values()) == [1, 1]


def test_decode_refuses_what_no_rank_can_hold_and_what_does_not_fit_now(leader_and_client):
    leader, client = leader_and_client("decode", [decode_load(0, used=99)])
    assert exchange(leader, client, reserve("huge", max_tokens=797)) == {}  # 800 tokens: 200 pages
    (answer,) = client.take_answers()
    assert answer.status == 400 and not answer.retry and "needs 200 KV pages, the cache has 100" in answer.message
    # fits a rank, but not now: retry elsewhere
    assert exchange(leader, client, reserve("later", max_tokens=17)) == {}
    (answer,) = client.take_answers()
    assert answer.status == 503 and answer.retry
    assert len(leader.routes) == 0  # refused requests leave no route behind


def test_prefill_prefers_the_rank_that_caches_the_prefix(leader_and_client):
    loads = [p.RankLoad(r, 0, 100, 0, 0, 0, 64) for r in range(2)]
    leader, client = leader_and_client("prefill", loads)
    prompt = list(range(40))
    (rank,) = exchange(leader, client, p.Prefill("a", prompt, KV))
    leader.loads = [p.RankLoad(r, 0, 100, 0, 0, 0, 64) for r in range(2)]  # idle again
    assert list(exchange(leader, client, p.Prefill("b", prompt + [99], KV))) == [rank]


def test_abort_goes_to_the_owning_rank_and_events_to_the_sender(leader_and_client):
    leader, client = leader_and_client("decode", [decode_load(0, used=90), decode_load(1)])
    exchange(leader, client, reserve("a"))
    assert exchange(leader, client, p.Abort("a")) == {1: [p.Abort("a")]}
    leader.deliver([p.Tokens("a", [1], False)])
    assert client.take_answers() == []  # aborted: the router no longer listens


def test_events_reach_the_router_and_a_final_one_closes_the_route(leader_and_client):
    leader, client = leader_and_client("decode", [decode_load(0)])
    exchange(leader, client, reserve("a"))
    leader.deliver([p.Reserved("a", KV, 0), p.Tokens("a", [5], False), p.Tokens("a", [6], True, "length")])
    assert [type(m).__name__ for m in client.take_answers(3)] == ["Reserved", "Tokens", "Tokens"]
    assert leader.routes.get("a") is None


def test_requests_before_the_first_report_wait_and_an_abort_cancels_them(leader_and_client):
    leader, client = leader_and_client("decode", [])
    assert exchange(leader, client, reserve("early"), reserve("gone"), expect=0) == {}
    assert {r.rid for r in leader.routes.deferred()} == {"early", "gone"}
    exchange(leader, client, p.Abort("gone"), expect=0)
    leader.loads = [decode_load(0)]
    assert exchange(leader, client, expect=1) == {0: [reserve("early")]}


def test_broken_and_foreign_messages_fail_alone_and_never_crash_the_leader(leader_and_client):
    leader, client = leader_and_client("decode", [decode_load(0)])
    broken = msgspec.msgpack.encode({"op": "reserve", "rid": "bad", "prompt": "not ids", "max_tokens": 4})
    unknown = msgspec.msgpack.encode({"op": "frobnicate", "rid": "x"})
    assert exchange(leader, client, b"\xc1 not msgpack", unknown, broken, p.Prefill("wrong", [1], KV),
                    reserve("ok"), expect=4) == {0: [reserve("ok")]}
    answers = {a.rid: a for a in client.take_answers()}
    assert set(answers) == {"bad", "x", "wrong"}  # those that name a request get an answer; garbage is dropped
    assert answers["bad"].status == 400 and "malformed request" in answers["bad"].message
    assert "Invalid value 'frobnicate'" in answers["x"].message
    assert answers["wrong"].status == 400 and "does not take 'prefill'" in answers["wrong"].message


def test_a_duplicate_request_id_is_refused(leader_and_client):
    leader, client = leader_and_client("decode", [decode_load(0), decode_load(1)])
    assert sum(map(len, exchange(leader, client, reserve("a"), reserve("a")).values())) == 1
    (answer,) = client.take_answers()
    assert "already running" in answer.message


def test_hello_is_answered_with_status_and_another_version_is_refused(leader_and_client):
    leader, client = leader_and_client("decode", [decode_load(0)])
    exchange(leader, client, p.Hello(p.PROTOCOL_VERSION), expect=1)
    (status,) = client.take_answers()
    assert status.version == p.PROTOCOL_VERSION and status.role == "decode" and status.ranks == [decode_load(0)]
    assert len(leader.routers) == 1
    exchange(leader, client, p.Hello(p.PROTOCOL_VERSION + 1), expect=1)
    assert len(leader.routers) == 0  # no heartbeats for a router that speaks another version


def test_the_status_carries_the_instances_eplb_figures_to_the_routers_metrics(leader_and_client):
    from prometheus_client import generate_latest

    from moe_pd.serve.metrics import Metrics

    leader, client = leader_and_client("decode", [decode_load(0)])
    leader.eplb_metrics = lambda: {"balancedness": {"window": [0.5, 0.75], "step": [0.25, 1.0]}, "rebalances": 3,
                                   "checks": 5, "bytes_moved": 4096}
    exchange(leader, client, p.Hello(p.PROTOCOL_VERSION), expect=1)
    (status,) = client.take_answers(1)
    assert status.eplb == p.EplbStatus({"window": [0.5, 0.75], "step": [0.25, 1.0]}, 3, 5, 4096)
    metrics = Metrics()
    metrics.instance("decode@x:1", "decode", True, msgspec.to_builtins(status.ranks), msgspec.to_builtins(status.eplb))
    text = generate_latest(metrics.registry).decode()
    assert 'moe_pd_eplb_balancedness{instance="decode@x:1",layer="1",role="decode",scope="window"} 0.75' in text


def test_a_draining_leader_says_so_and_leaves_once_nothing_is_held(leader_and_client, monkeypatch):
    import moe_pd.serve.leader as leader_module

    clock = {"now": 100.0}
    monkeypatch.setattr(leader_module.time, "monotonic", lambda: clock["now"])
    leader, router = leader_and_client("decode", [decode_load(0)])
    leader.cfg.heartbeat_s, leader.cfg.drain_timeout_s = 0.5, 10.0
    exchange(leader, router, reserve("a.0"))
    assert not leader.drained() and leader.status().draining  # the drain starts; the routers hear it at once
    clock["now"] += 0.6
    assert not leader.drained()  # nothing held yet, but the routers have not had two heartbeats
    clock["now"] += 0.6
    assert not leader.drained()  # two heartbeats, but a route is held
    leader.routes.close("a.0")
    leader.loads = [decode_load(0, running=1)]
    assert not leader.drained()  # and a rank still runs a request
    leader.loads = [decode_load(0)]
    assert leader.drained()


def test_a_drain_ends_at_its_timeout_whatever_is_held(leader_and_client, monkeypatch):
    import moe_pd.serve.leader as leader_module

    clock = {"now": 100.0}
    monkeypatch.setattr(leader_module.time, "monotonic", lambda: clock["now"])
    leader, router = leader_and_client("decode", [decode_load(0, running=3)])
    leader.cfg.drain_timeout_s = 2.0
    assert not leader.drained()
    clock["now"] += 2.5
    assert leader.drained()
