"""Per-rank flight recorder: the last collectives this rank started, with their tags, sizes and timing.

Communication code calls `start(...)` before issuing a collective and `finish(entry)` after waiting on it;
the watchdog reads `oldest_pending()` and dumps `snapshot()` when something hangs.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field


@dataclass
class CommEntry:
    seq: int
    op: str
    """e.g. 'dispatch.counts', 'dispatch', 'combine', 'step.sync'."""
    tag: str
    """Where in the model: 'layer3', 'layer3/mb1', ... ('' when not inside a layer)."""
    send_rows: int = 0
    recv_rows: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    def describe(self) -> str:
        where = f" {self.tag}" if self.tag else ""
        return f"#{self.seq} {self.op}{where} (send {self.send_rows} rows, recv {self.recv_rows} rows)"


class FlightRecorder:
    def __init__(self, size: int = 512) -> None:
        self._entries: deque[CommEntry] = deque(maxlen=size)
        self._pending: dict[int, CommEntry] = {}
        self._seq = 0
        self._lock = threading.Lock()

    def start(self, op: str, tag: str = "", send_rows: int = 0, recv_rows: int = 0, nbytes: int = 0) -> CommEntry:
        with self._lock:
            self._seq += 1
            entry = CommEntry(self._seq, op, tag, send_rows, recv_rows, nbytes)
            self._entries.append(entry)
            self._pending[entry.seq] = entry
            return entry

    def finish(self, entry: CommEntry, recv_rows: int | None = None) -> None:
        with self._lock:
            entry.finished = time.monotonic()
            if recv_rows is not None:
                entry.recv_rows = recv_rows
            self._pending.pop(entry.seq, None)

    @property
    def last_started(self) -> CommEntry | None:
        with self._lock:
            return self._entries[-1] if self._entries else None

    def oldest_pending(self) -> CommEntry | None:
        with self._lock:
            return min(self._pending.values(), key=lambda e: e.seq) if self._pending else None

    def snapshot(self) -> list[dict]:
        now = time.monotonic()
        with self._lock:
            out = []
            for e in self._entries:
                d = asdict(e)
                d["age_s"] = round(now - e.started, 3)
                d["duration_s"] = None if e.finished is None else round(e.finished - e.started, 6)
                del d["started"], d["finished"]
                out.append(d)
            return out
