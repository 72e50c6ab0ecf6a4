"""A rank's command errors: only a request's own content is the client's fault (400); no pages is a 503 the
router may retry; anything else is the server's (500), and the rank carries on."""

from types import SimpleNamespace

import pytest

from moe_pd.engine.core.request import InvalidRequest
from moe_pd.kvcache.block_manager import OutOfBlocks
from moe_pd.kvcache.transfer.base import KVTarget
from moe_pd.serve import protocol as p
from moe_pd.serve.rank import ColocatedRank, DecodeRank


def rank_with(add_request, cls=ColocatedRank):
    engine = SimpleNamespace(add_request=add_request, abort=lambda rid: True)
    worker = SimpleNamespace(reserve=lambda *a: add_request(*a), abort=lambda rid, writer: None, address="tcp://kv",
                             target=lambda req: KVTarget("zmq", "tcp://kv", 30.0))
    return cls(engine, 3, 8) if cls is ColocatedRank else cls(engine, 3, 8, worker)


def raising(exc):
    def add(*_):
        raise exc
    return add


@pytest.mark.parametrize("exc, status, retry", [
    (InvalidRequest("request a: the prompt is empty"), 400, False),
    (OutOfBlocks("need 4 pages, 1 free"), 503, True),
    (RuntimeError("a bug"), 500, False),
    (ValueError("a bug that happens to be a ValueError"), 500, False),
])
def test_errors_are_mapped_by_cause(exc, status, retry):
    (error,) = rank_with(raising(exc)).apply(p.Generate("a.0", [1], 4))
    assert isinstance(error, p.Error) and (error.rid, error.status, error.retry) == ("a.0", status, retry)
    assert "rank" not in error.message and "pages," not in error.message  # no internal details
    if status == 500:
        assert "a bug" not in error.message and error.message == "internal error"


def test_a_request_for_another_role_is_refused_and_a_reservation_answered():
    decode = rank_with(lambda *a: None, DecodeRank)
    (error,) = decode.apply(p.Generate("a.0", [1], 4))
    assert error.status == 400 and "does not take 'generate'" in error.message
    assert decode.apply(p.Reserve("b.0", [1], 4)) == [p.Reserved("b.0", KVTarget("zmq", "tcp://kv", 30.0), 3)]
    assert decode.apply(p.Abort("b.0")) == []


def test_a_ranks_load_travels_in_its_report():
    from moe_pd.engine.core.table import RequestTable
    from moe_pd.kvcache.block_manager import BlockManager

    allocator = BlockManager(8, 4)
    from moe_pd.engine.llm_engine import StepStats

    engine = SimpleNamespace(requests=RequestTable(allocator, 64), allocator=allocator, stats=StepStats(),
                             tier_usage=dict)
    report = p.RankReport(3, ColocatedRank(engine, 3, 8).load())
    assert p.decode_report(p.encode(report), 3) == report and report.load.reserved == 0
