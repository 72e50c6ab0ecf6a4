"""The one place that knows where traces go and how the profiler is driven.

Traces: <run_dir>/profile/<role>/iter_<step>/rank<rank>_trace.json.gz, one per rank, Chrome trace format
(opens in Perfetto or chrome://tracing; `python -m moe_pd.profiling.report` merges the ranks). Model code
labels its work with record_function ranges named 'L<layer> <STAGE>(<micro-batch>)', e.g. 'L3 ATTN-0(1)',
'L3 DISPATCH(0)', 'L3 DISPATCH-WAIT(0)'; those ranges are entered only while a profiler runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from moe_pd.config.overlap import ProfileConfig

log = logging.getLogger(__name__)

TRACE_NAME = "rank{rank}_trace.json.gz"


def iter_dir(run_dir: str | Path, role: str, step: int) -> Path:
    return Path(run_dir) / "profile" / role / f"iter_{step}"


def trace_path(run_dir: str | Path, role: str, step: int, rank: int) -> Path:
    return iter_dir(run_dir, role, step) / TRACE_NAME.format(rank=rank)


class RankProfiler:
    """torch.profiler on one rank with the configured wait/warm-up/active schedule; `step()` once per
    engine step (every rank at the same steps, so the ranks' traces cover the same iterations)."""

    def __init__(self, cfg: ProfileConfig, run_dir: str | Path, role: str, rank: int) -> None:
        self.cfg, self.run_dir, self.role, self.rank = cfg, Path(run_dir), role, rank
        self.written: list[Path] = []
        self._prof = None
        if cfg.enabled:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._prof = profile(
                activities=activities,
                schedule=schedule(wait=cfg.wait, warmup=cfg.warmup, active=cfg.active, repeat=cfg.repeat),
                on_trace_ready=self._export, record_shapes=cfg.record_shapes, with_stack=cfg.with_stack)

    def _export(self, prof) -> None:
        path = trace_path(self.run_dir, self.role, prof.step_num, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(path))
        self.written.append(path)
        log.info("profile: wrote %s", path)

    def __enter__(self) -> "RankProfiler":
        if self._prof is not None:
            self._prof.__enter__()
        return self

    def step(self) -> None:
        if self._prof is not None:
            self._prof.step()

    def __exit__(self, *exc) -> None:
        if self._prof is not None:
            self._prof.__exit__(*exc)
