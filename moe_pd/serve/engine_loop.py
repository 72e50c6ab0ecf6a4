"""The HTTP app's one-process backend: the engine in a background thread, which HTTP handlers talk to
through thread-safe calls. Each request's record (engine.requests) holds its Stream as its listener.

Handlers `submit` a request and read its tokens from an asyncio queue; the loop thread adds and aborts
requests between steps (the engine is only ever touched by this thread) and pushes each step's outputs to
the right queues with `call_soon_threadsafe`.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING

import msgspec

from moe_pd.engine.core.request import InvalidRequest
from moe_pd.engine.llm_engine import LLMEngine
from moe_pd.serve.backend import Chunk, Job, Stream
from moe_pd.serve.rank import tier_figures

if TYPE_CHECKING:
    from moe_pd.serve.metrics import Metrics

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moe_pd-engine", daemon=True)
        self.steps = 0

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._commands.put(None)
        self._thread.join(timeout=10)

    def submit(self, stream: Stream, job: Job) -> None:
        self._commands.put(("add", stream, job.prompt_ids, job.max_tokens, job.params, job.seed, job.ignore_eos))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting)

    def health(self) -> tuple[bool, dict]:
        alloc = self.engine.allocator
        spec = self.engine.stats.spec
        ranks = [{"rank": 0, "running": self.num_running, "waiting": self.num_waiting, "kv_used": alloc.num_used,
                  "kv_total": alloc.num_blocks, "spec_verifications": spec.verifications if spec else 0,
                  "spec_accepted_at": list(spec.accepted_at) if spec else [],
                  "tiers": msgspec.to_builtins(tier_figures(self.engine))}]
        return self._thread.is_alive(), {"status": "ok" if self._thread.is_alive() else "down",
                                         "engine_steps": self.steps,
                                         "instances": [{"name": "local", "role": "colocated", "up": True,
                                                        "ranks": ranks}]}

    def refresh(self, metrics: "Metrics") -> None:
        _, body = self.health()
        metrics.instance("local", "colocated", True, body["instances"][0]["ranks"])

    def _push(self, stream: Stream, item) -> None:
        stream.loop.call_soon_threadsafe(stream.put, item)

    def _apply(self, command) -> None:
        if command[0] == "add":
            _, stream, prompt_ids, max_tokens, params, seed, ignore_eos = command
            try:
                self.engine.add_request(stream.request_id, prompt_ids, max_tokens, params, seed, ignore_eos,
                                        listener=stream)
            except InvalidRequest as exc:
                self._push(stream, exc)
            except Exception as exc:  # a bug: this request fails, the engine thread carries on
                log.exception("adding request %s failed", stream.request_id)
                self._push(stream, RuntimeError(f"internal error: {type(exc).__name__}"))
        elif command[0] == "abort":
            self.engine.abort(command[1])

    def _run(self) -> None:
        while not self._stop.is_set():
            block = not self.engine.has_work
            try:
                command = self._commands.get(timeout=0.05) if block else self._commands.get_nowait()
            except queue.Empty:
                command = None
            while command is not None:
                self._apply(command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if self._stop.is_set() or not self.engine.has_work:
                continue
            try:
                _, outputs = self.engine.step()
            except Exception as exc:  # the engine failed: fail every request instead of hanging them
                log.exception("engine step failed")
                for req in list(self.engine.requests.live.values()):
                    self._push(req.listener, RuntimeError(f"engine failure: {exc}"))
                    self.engine.abort(req.request_id)
                continue
            self.steps += 1
            for out in outputs:
                reason = out.finish_reason or ""
                if out.finished and reason.startswith("error"):  # this request alone failed in the step
                    self._push(out.listener, RuntimeError(reason))
                    continue
                self._push(out.listener, Chunk(out.new_token_ids, out.finished, out.finish_reason, out.logprobs,
                                               out.prompt_logprobs, out.cached_tokens))
