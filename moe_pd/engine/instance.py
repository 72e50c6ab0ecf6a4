"""What every rank of an EP group builds before it runs requests, in one start-up path that `moe_pd.generate`
and the serving instances share: the process group, the EP model with its dispatcher and load balancer,
the watchdog over its collectives, the profiler and the per-step sync; and the shutdown that undoes them."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_pd.config.engine import RankGroupConfig
from moe_pd.config.errors import ConfigError
from moe_pd.config.hf import resolve_model_config
from moe_pd.config.model import ModelConfig
from moe_pd.config.parallel import ParallelConfig
from moe_pd.config.runtime import RuntimeConfig
from moe_pd.eplb.manager import initial_placement, make_eplb_manager
from moe_pd.eplb.replica_routing import ReplicaRouter
from moe_pd.model.loader import build_model
from moe_pd.model.ops import select_ops
from moe_pd.model.transformer import DeepseekForCausalLM
from moe_pd.parallel.dispatch import make_dispatcher
from moe_pd.parallel.flight_recorder import FlightRecorder
from moe_pd.parallel.state import ParallelState, init_parallel, shutdown
from moe_pd.parallel.step_sync import StepSync
from moe_pd.parallel.watchdog import Watchdog, default_store
from moe_pd.profiling.profiler import RankProfiler
from moe_pd.runtime import resolve_device, resolve_dtype

log = logging.getLogger(__name__)


@dataclass
class InstanceModel:
    model: DeepseekForCausalLM
    dispatcher: object
    eplb: object | None
    """The online EPLB manager (None when eplb is disabled)."""


@dataclass
class RankGroup:
    """One rank's share of an EP group, ready to step."""

    state: ParallelState
    model_cfg: ModelConfig
    model: DeepseekForCausalLM
    sync: StepSync
    """The per-step all-reduce every engine step goes through (EPLB and the profiler hang off it)."""
    eplb: object | None


@contextmanager
def rank_group(cfg: RankGroupConfig, role: str, run_dir: str | None,
               model_cfg: ModelConfig | None = None) -> Iterator[RankGroup]:
    """Joins the process group, builds this rank's model, and profiles what runs inside; on exit (also on an
    error) stops the watchdog and leaves the group. `role` names the profile folder."""
    model_cfg = model_cfg or resolve_model_config(cfg.model)
    device, dtype = resolve_device(cfg.runtime), resolve_dtype(cfg.runtime)
    state = init_parallel(cfg.parallel, model_cfg, device)
    recorder = FlightRecorder(cfg.parallel.flight_recorder_size)
    watchdog = start_watchdog(cfg.parallel, state, recorder, run_dir)
    try:
        built = build_instance_model(model_cfg, cfg, state, dtype, recorder)
        profiler = RankProfiler(cfg.profile, run_dir or ".", role, state.rank)
        hooks = ([built.eplb.on_step] if built.eplb else []) + [profiler.step]
        sync = StepSync(state, recorder, built.dispatcher, hooks=hooks)
        with profiler:
            yield RankGroup(state, model_cfg, built.model, sync, built.eplb)
    finally:
        if watchdog is not None:
            watchdog.stop()
        shutdown(state)


def build_instance_model(model_cfg: ModelConfig, cfg: RankGroupConfig, state: ParallelState, dtype: torch.dtype,
                         recorder: FlightRecorder) -> InstanceModel:
    """This rank's share of the model: its expert slots (by the initial placement) behind the dispatcher,
    running the kernels runtime.kernels selects, its experts in FP8 with runtime.fp8_experts; with its MTP layer
    when speculative decoding is on."""
    t0 = time.perf_counter()
    eplb, runtime = cfg.eplb, cfg.runtime
    placement = initial_placement(eplb, state, model_cfg)
    dispatcher = make_dispatcher(cfg.parallel, state, model_cfg.hidden_size, placement, recorder,
                                 model_cfg.num_experts_per_tok, dtype, cfg.testing.comm_delay_ms)
    dispatcher.dynamic_routing = eplb.routing == "dynamic"
    if eplb.routing == "balanced":
        dispatcher.replica_router = ReplicaRouter(state)
    model = build_model(model_cfg, device=state.device, dtype=dtype, dispatcher=dispatcher,
                        expert_ids=lambda layer: placement.rank_experts(state.ep_rank, layer),
                        ops=select_ops(runtime.kernels, state.device), fp8_experts=runtime.fp8_experts,
                        mtp=cfg.speculative.num_draft_tokens > 0)
    manager = make_eplb_manager(eplb, state, model_cfg, model, dispatcher)
    log.info("model %s (%s) ready in %.1f s; EP %d, %d expert slots per rank; %s kernels", model_cfg.architecture,
             model_cfg.path or "random weights", time.perf_counter() - t0, state.ep_size, state.experts_per_rank,
             model.ops.name)
    return InstanceModel(model, dispatcher, manager)


def start_watchdog(parallel: ParallelConfig, state: ParallelState, recorder: FlightRecorder,
                   run_dir: str | None) -> Watchdog | None:
    """A watchdog that names the slowest rank when a collective hangs (multi-rank jobs only)."""
    if state.world_size == 1 or parallel.collective_timeout_s <= 0:
        return None
    dump_dir = Path(run_dir) / "flight_recorder" if run_dir else None
    return Watchdog(recorder, state.rank, state.world_size, parallel.collective_timeout_s, default_store(),
                    dump_dir).start()


def graphs_wanted(runtime: RuntimeConfig, state: ParallelState, model: DeepseekForCausalLM) -> bool:
    """runtime.cuda_graphs, for a one-process job (EP > 1 steps through collectives the graphs do not hold)
    whose model runs the Triton kernels."""
    if not runtime.cuda_graphs:
        return False
    if state.world_size > 1:
        log.warning("runtime.cuda_graphs is for one process (EP = 1); this job has %d ranks: running eagerly",
                    state.world_size)
        return False
    if model.ops is None or not model.ops.has_mla_decode:
        raise ConfigError("runtime.cuda_graphs needs the Triton kernels: a CUDA device with runtime.kernels=auto "
                          "or triton (on CPU: runtime.kernels=triton under TRITON_INTERPRET=1, tests only)")
    return True
