"""The loop every rank of an instance runs: one control exchange per iteration, then a common engine step.

Every iteration each rank sends one RankReport (its load, its events, whether its engine has work, whether
it was asked to stop) through the ControlPlane; the leader's report also carries every rank's commands,
which it read from the routers. A rank asked to stop starts the instance's drain: the leader tells its routers
(Status.draining), the ranks finish what they hold, and once nothing is left (or `drain_timeout_s` passed) the
leader's report says `leave` and every rank returns in the same iteration. If any rank has engine work or
got a command, all ranks then run one engine step together: an idle rank runs an empty forward, so every MoE
all-to-all stays paired. The decision is taken from the exchanged reports only, so it is the same on every
rank.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from moe_pd.parallel.control_plane import ControlPlane
from moe_pd.serve import protocol as p
from moe_pd.serve.leader import Leader
from moe_pd.serve.rank import Rank

log = logging.getLogger(__name__)


def serve_rank(worker: Rank, plane: ControlPlane, leader: Leader | None, should_stop: Callable[[], bool],
               idle_wait_ms: float) -> None:
    """Runs until the instance has drained after a rank was asked to stop (SIGTERM/SIGINT): the leader then
    says `leave` and every rank returns. `leader`: rank 0's, None on the other ranks."""
    events: list[p.Event] = []
    busy = False
    leave = False
    while True:
        commands = leader.collect(0 if busy or events else idle_wait_ms) if leader else {}
        mine = p.RankReport(worker.rank, worker.load(), events, worker.busy, should_stop(), leave=leave,
                            commands=commands, cache=worker.cache_events())
        raw = plane.exchange(p.encode(mine))
        reports = [r for rank, data in enumerate(raw) if (r := p.decode_report(data, rank)) is not None]
        if any(r.leave for r in reports):
            return
        if leader is not None:
            leader.loads = [r.load for r in reports]
            leader.observe_cache(reports)
            leader.deliver([e for r in reports for e in r.events])
            if any(r.stop for r in reports):
                leave = leader.drained()
            leader.heartbeat()
        everyone = next((r.commands for r in reports if r.rank == 0), {})
        events = [e for cmd in everyone.get(worker.rank, []) for e in worker.apply(cmd)]
        # Only exchanged facts decide whether to step, so every rank decides the same.
        busy = any(r.busy for r in reports) or any(everyone.values())
        events += worker.step(busy)
