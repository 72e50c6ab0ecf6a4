"""An instance leader's decisions on plain messages: which rank gets each request, what it refuses."""

import json
from types import SimpleNamespace

import pytest
import zmq

from moe_pd.config.serve import ServiceConfig
from moe_pd.serve.service import Leader, RankLoad


def fake_engine(block_size=4, pages_per_request=3):
    return SimpleNamespace(cache=SimpleNamespace(block_size=block_size),
                           pages_needed=lambda prompt_len, max_tokens: pages_per_request)


class Router:
    """The router's end of a leader's socket: sends requests, keeps the leader's answers."""

    def __init__(self, address: str) -> None:
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.answers: list[dict] = []

    def receive(self) -> None:
        while self.socket.poll(0):
            self.answers.append(json.loads(self.socket.recv()))

    def take_answers(self) -> list[dict]:
        self.receive()
        out, self.answers = self.answers, []
        return out


@pytest.fixture
def leader_and_client():
    made = []

    def make(role, loads, **engine):
        leader = Leader(ServiceConfig(role=role, port=0), fake_engine(**engine), len(loads), f"{role}-test")
        leader.loads = loads
        made.append((leader, Router(leader.address)))
        return made[-1]

    yield make
    for leader, router in made:
        router.socket.close(0)
        leader.close()


def exchange(leader, router, *messages):
    """Sends the messages; returns the commands per rank once each message became a command or an answer."""
    for msg in messages:
        router.socket.send(json.dumps(msg).encode())
    commands = {}
    for _ in range(50):
        for rank, cmds in leader.collect(wait_ms=20).items():
            commands.setdefault(rank, []).extend(cmds)
        router.receive()
        if sum(map(len, commands.values())) + len(router.answers) >= len(messages):
            break
    return commands


def decode_load(rank, used=0, total=100, running=0, address=""):
    return RankLoad(rank, used, total, running, 0, 0, 64, address or f"tcp://d{rank}")


def reserve(rid, exclude=(), prompt=(1, 2, 3)):
    return {"op": "reserve", "rid": rid, "prompt": list(prompt), "max_tokens": 4, "params": {},
            "exclude": list(exclude)}


def test_decode_goes_to_the_least_loaded_rank_and_respects_the_exclusion(leader_and_client):
    leader, client = leader_and_client("decode", [decode_load(0, used=50), decode_load(1, used=10)])
    assert exchange(leader, client, reserve("a")) == {1: [reserve("a")]}
    # a re-run after rank 1's transfer failed avoids rank 1
    assert exchange(leader, client, reserve("b", exclude=["tcp://d1"])) == {0: [reserve("b", ["tcp://d1"])]}


def test_a_burst_is_spread_because_each_choice_counts_against_its_rank(leader_and_client):
    leader, client = leader_and_client("decode", [decode_load(0), decode_load(1)], pages_per_request=30)
    commands = exchange(leader, client, reserve("a"), reserve("b"))
    assert sorted(len(c) for c in commands.values()) == [1, 1]


def test_decode_refuses_what_no_rank_can_hold_and_what_does_not_fit_now(leader_and_client):
    leader, client = leader_and_client("decode", [decode_load(0, used=99)], pages_per_request=200)
    assert exchange(leader, client, reserve("huge")) == {}
    (answer,) = client.take_answers()
    assert answer["status"] == 400 and not answer["retry"] and "needs 200 KV pages" in answer["message"]
    leader.engine.pages_needed = lambda *_: 5  # fits a rank, but not now: retry elsewhere
    assert exchange(leader, client, reserve("later")) == {}
    (answer,) = client.take_answers()
    assert answer["status"] == 503 and answer["retry"]


def test_prefill_prefers_the_rank_that_caches_the_prefix(leader_and_client):
    loads = [RankLoad(r, 0, 100, 0, 0, 0, 64) for r in range(2)]
    leader, client = leader_and_client("prefill", loads)
    prompt = list(range(40))
    first = {"op": "prefill", "rid": "a", "prompt": prompt, "params": {}, "decode": "tcp://d0"}
    (rank,) = exchange(leader, client, first)
    leader.loads = [RankLoad(r, 0, 100, 0, 0, 0, 64) for r in range(2)]  # idle again
    again = {**first, "rid": "b", "prompt": prompt + [99]}
    assert list(exchange(leader, client, again)) == [rank]


def test_abort_goes_to_the_owning_rank_and_events_to_the_sender(leader_and_client):
    leader, client = leader_and_client("decode", [decode_load(0, used=90), decode_load(1)])
    exchange(leader, client, reserve("a"))
    assert exchange(leader, client, {"op": "abort", "rid": "a"}) == {1: [{"op": "abort", "rid": "a"}]}
    leader.deliver([{"op": "tokens", "rid": "a", "ids": [1], "finished": False, "reason": None}])
    assert client.take_answers() == []  # aborted: the router no longer listens
