"""Hang watchdog: turns a stuck collective into a report and a non-zero exit instead of a silent hang.

A daemon thread per rank publishes the rank's progress (its last started collective) to the job's
key-value store every `poll_s`. When a collective on this rank stays unfinished longer than the timeout,
the thread reads every rank's progress, names the rank that is furthest behind (the one the others are
waiting for), raises an abort flag in the store and dumps this rank's flight recorder. Every other rank
sees the flag within `poll_s` and dumps its own; once all have dumped (or a few seconds passed) each
process exits with EXIT_CODE, so torchrun ends the job with a non-zero status.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from moe_pd.parallel.flight_recorder import FlightRecorder

log = logging.getLogger(__name__)

EXIT_CODE = 3
_PREFIX = "moe_pd/watchdog/"


def default_store() -> Any:
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def slowest_rank(progress: dict[int, int]) -> int:
    """The rank with the fewest collectives started (ties: the lowest rank)."""
    return min(progress, key=lambda r: (progress[r], r))


class Watchdog:
    def __init__(self, recorder: FlightRecorder, rank: int, world_size: int, timeout_s: float, store: Any,
                 dump_dir: str | Path | None = None, poll_s: float | None = None,
                 exit_fn: Callable[[int], None] = os._exit) -> None:
        self.recorder, self.rank, self.world_size = recorder, rank, world_size
        self.timeout_s, self.store = timeout_s, store
        self.poll_s = poll_s if poll_s is not None else min(1.0, max(timeout_s / 10, 0.05))
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.exit_fn = exit_fn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"moe_pd-watchdog-rank{rank}", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _key(self, name: str) -> str:
        return _PREFIX + name

    def _progress(self) -> int:
        last = self.recorder.last_started
        return last.seq if last else 0

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.store.set(self._key(f"progress/{self.rank}"), str(self._progress()))
                if self.store.check([self._key("abort")]):
                    reason = self.store.get(self._key("abort")).decode()
                    self._abort(f"rank {self.rank}: stopping because {reason}")
                    return
                pending = self.recorder.oldest_pending()
                if pending and time.monotonic() - pending.started > self.timeout_s:
                    self._abort(self._report(pending), raise_flag=True)
                    return
            except Exception as exc:  # the store went away: the job is ending anyway
                log.debug("watchdog poll failed: %s", exc)

    def _report(self, pending) -> str:
        progress = {}
        for r in range(self.world_size):
            key = self._key(f"progress/{r}")
            progress[r] = int(self.store.get(key)) if self.store.check([key]) else 0
        slow = slowest_rank(progress)
        return (f"collective {pending.describe()} on rank {self.rank} did not finish within {self.timeout_s:g} s; "
                f"slowest rank: {slow} (collectives started per rank: {progress})")

    def _abort(self, message: str, raise_flag: bool = False) -> None:
        if raise_flag:
            self.store.set(self._key("abort"), message)
        dump = json.dumps({"rank": self.rank, "message": message, "entries": self.recorder.snapshot()[-32:]})
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / f"rank{self.rank}.json").write_text(dump)
        print(f"[rank{self.rank}] watchdog: {message}\n[rank{self.rank}] flight recorder: {dump}",
              file=sys.stderr, flush=True)
        try:
            self.store.set(self._key(f"dumped/{self.rank}"), "1")
            # The first rank to exit makes torchrun stop the others: wait (bounded) until every rank dumped.
            deadline = time.monotonic() + max(5.0, 5 * self.poll_s)
            keys = [self._key(f"dumped/{r}") for r in range(self.world_size)]
            while time.monotonic() < deadline and not self.store.check(keys):
                time.sleep(self.poll_s / 2)
        except Exception as exc:
            log.debug("watchdog: store unavailable while aborting: %s", exc)
        self.exit_fn(EXIT_CODE)
