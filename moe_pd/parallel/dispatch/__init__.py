"""Token dispatchers: one contract (base.Dispatcher), several backends, chosen once at start-up."""

from __future__ import annotations

from moe_pd.config.errors import ConfigError
from moe_pd.config.parallel import ParallelConfig
from moe_pd.parallel.dispatch.base import Dispatcher, DispatchResult
from moe_pd.parallel.dispatch.local import LocalDispatcher
from moe_pd.parallel.flight_recorder import FlightRecorder
from moe_pd.parallel.placement import ExpertPlacement
from moe_pd.parallel.state import ParallelState

__all__ = ["Dispatcher", "DispatchResult", "LocalDispatcher", "make_dispatcher"]


def make_dispatcher(cfg: ParallelConfig, state: ParallelState, hidden_size: int,
                    placement: ExpertPlacement | None = None, recorder: FlightRecorder | None = None,
                    top_k: int = 8, dtype=None, comm_delay_ms: float = 0.0) -> Dispatcher:
    """`comm_delay_ms`: testing.comm_delay_ms, the latency the all_to_all backend adds to every exchange."""
    kind = cfg.dispatcher
    if kind == "auto":
        kind = "local" if state.ep_size == 1 else "all_to_all"
    if kind == "local":
        if state.ep_size != 1:
            raise ConfigError(f"parallel.dispatcher='local' needs one rank, the job has {state.ep_size}")
        return LocalDispatcher(state.num_experts)
    if kind == "all_to_all":
        from moe_pd.parallel.dispatch.all_to_all import AllToAllDispatcher

        return AllToAllDispatcher(state, hidden_size, placement, recorder, fp8=cfg.fp8_dispatch,
                                  delay_s=comm_delay_ms / 1000, padded_max_tokens=cfg.padded_max_tokens)
    if kind == "deepep" and cfg.deepep_api == "v2":
        from moe_pd.parallel.dispatch.deepep_v2 import make_deepep_v2_dispatcher

        return make_deepep_v2_dispatcher(state, hidden_size, _placement(placement, state), cfg.deepep_mode,
                                         cfg.deepep_max_tokens_per_rank, cfg.deepep_max_dispatch_tokens_per_rank,
                                         cfg.fp8_dispatch, top_k)
    if kind == "deepep":
        from moe_pd.parallel.dispatch.deepep import make_deepep_dispatcher

        return make_deepep_dispatcher(state, hidden_size, _placement(placement, state), cfg.deepep_mode,
                                      cfg.deepep_max_dispatch_tokens_per_rank, cfg.fp8_dispatch)
    if kind == "nvshmem":
        import torch

        from moe_pd.parallel.dispatch.nvshmem import NvshmemDispatcher

        return NvshmemDispatcher(state, hidden_size, _placement(placement, state), recorder, top_k,
                                 dtype=dtype or torch.bfloat16)
    raise ConfigError(f"parallel.dispatcher={kind!r}: unknown")


def _placement(placement: ExpertPlacement | None, state: ParallelState) -> ExpertPlacement:
    return placement or ExpertPlacement.contiguous(1, state.num_experts, 0, state.ep_size)
