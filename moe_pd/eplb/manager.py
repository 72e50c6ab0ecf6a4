"""Runs EPLB inside a serving or generation loop: initial placement, recording, online rebalancing.

Every rank calls `on_step` at the same step (StepSync runs it after the per-step all-reduce). Every
`rebalance_every` steps the ranks sum their load windows into a history of `history_windows` windows and
compute the same plan for the next window (the planner is deterministic): a layer is replanned only where
the expected gain pays for its weight moves (rebalance_experts with `current`, next_window.py). The
changed layers then move `layers_per_step` at a time, one chunk per step between forwards: each chunk's
experts are fetched point-to-point from a rank that already holds them and its layers' maps switch as
it lands, so requests in flight keep running on a placement that is whole for every layer. Predicted and
measured balancedness, bytes moved and the time each switch took are logged and kept for /metrics.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from moe_pd.config.eplb import EplbConfig
from moe_pd.config.model import ModelConfig
from moe_pd.eplb import rebalance_experts
from moe_pd.eplb.metrics import balancedness, gpu_loads
from moe_pd.eplb.recorder import ExpertLoadRecorder, LoadStats, load_stats, save_stats
from moe_pd.parallel.dispatch.base import Dispatcher
from moe_pd.parallel.placement import ExpertPlacement
from moe_pd.parallel.state import ParallelState, default_placement

log = logging.getLogger(__name__)


def plan_placement(load: torch.Tensor, eplb: EplbConfig, state: ParallelState, model: ModelConfig,
                   current: ExpertPlacement | None = None) -> ExpertPlacement:
    """A placement for `load` ([L, E], or a history [T, L, E]); with `current`, only where it pays."""
    phy2log, _, _ = rebalance_experts(load.float(), state.num_experts, model.n_group, eplb.num_nodes,
                                      state.ep_size, eplb.policy, None if current is None else current.phy2log_LP,
                                      eplb.min_gain, eplb.move_cost)
    return ExpertPlacement.from_phy2log(phy2log, model.n_routed_experts, state.ep_size, model.first_k_dense_replace)


def initial_placement(eplb: EplbConfig, state: ParallelState, model: ModelConfig) -> ExpertPlacement:
    if eplb.init_from is None:
        return default_placement(state, model)
    stats = load_stats(eplb.init_from)
    load = stats.expert_load_LE
    if tuple(load.shape) == (model.num_moe_layers, model.n_routed_experts) and model.num_nextn_predict_layers:
        # recorded without the MTP layers: they get the decoder layers' mean load (a balanced placement)
        load = torch.cat([load, load.float().mean(0, keepdim=True).expand(model.num_nextn_predict_layers, -1)])
    want = (model.num_expert_layers, model.n_routed_experts)
    if tuple(load.shape) != want:
        raise ValueError(f"eplb.init_from={eplb.init_from}: load table {tuple(load.shape)} does not match this "
                         f"model's (MoE layers with the MTP layers', experts) = {want}")
    placement = plan_placement(load, eplb, state, model)
    log.info("EPLB: initial placement planned from %s (%s policy)", eplb.init_from, eplb.policy)
    return placement


class EplbManager:
    def __init__(self, eplb: EplbConfig, state: ParallelState, model_cfg: ModelConfig, model: torch.nn.Module,
                 dispatcher: Dispatcher, recorder: ExpertLoadRecorder) -> None:
        self.eplb, self.state, self.model_cfg, self.model = eplb, state, model_cfg, model
        self.dispatcher, self.recorder = dispatcher, recorder
        self.steps = 0
        self.rebalances: list[dict] = []
        self.history: list[torch.Tensor] = []
        self._pending: tuple[ExpertPlacement, list[int]] | None = None  # target, model layers still to move
        self.bytes_moved = 0
        """Bytes of expert weights moved between ranks since start-up (all ranks together)."""
        self.balancedness = {"window": [], "step": []}
        """Measured per MoE layer at the last rebalance check: over its window and in its last step."""
        self._experts = {i: moe.experts for i, moe in model.moe_layers().items()}

    def on_step(self) -> None:
        self.steps += 1
        last = self.recorder.last_received()
        self.recorder.begin_step()
        if self._pending is not None:
            self._advance()
            return
        every = self.eplb.rebalance_every
        if every and self.steps % every == 0:
            self.rebalance(last)

    def metrics(self) -> dict:
        """What /metrics shows: balancedness per MoE layer (window and last step), rebalances, bytes moved."""
        return {"balancedness": self.balancedness, "rebalances": sum(r["switched"] for r in self.rebalances),
                "checks": len(self.rebalances), "bytes_moved": self.bytes_moved}

    def _placement(self) -> ExpertPlacement | None:
        """The placement in service, its maps on the host (the dispatcher keeps them on the ids' device)."""
        placement = self.dispatcher.placement
        return None if placement is None else placement.to(torch.device("cpu"))

    # load over the group --------------------------------------------------------------------------------
    def _group_load(self) -> torch.Tensor:
        load = self.recorder.window_load().clone()
        if self.state.world_size > 1:
            load = load.to(self.state.device) if self.state.backend == "nccl" else load.cpu()
            dist.all_reduce(load, group=self.state.group)
        return load.cpu()

    def _group_received(self, last: torch.Tensor | None = None) -> torch.Tensor:
        """Rows each rank received per layer over the window [R, L], or [R, 2, L] with the last step's."""
        recv = self.recorder.window_received()
        if last is not None:
            recv = torch.stack([recv, last])
        if self.state.world_size == 1:
            return recv[None]
        parts = [torch.zeros_like(recv) for _ in range(self.state.world_size)]
        dist.all_gather(parts, recv, group=self.state.group)
        return torch.stack(parts)

    def stats(self) -> LoadStats:
        meta = {"model": self.model_cfg.architecture, "num_moe_layers": self.model_cfg.num_moe_layers,
                "num_mtp_layers": self.model_cfg.num_nextn_predict_layers,
                "first_layer": self.model_cfg.first_k_dense_replace, "num_experts": self.model_cfg.n_routed_experts,
                "n_group": self.model_cfg.n_group, "hidden_size": self.model_cfg.hidden_size,
                "moe_intermediate_size": self.model_cfg.moe_intermediate_size, "window_steps": self.eplb.window_steps,
                "steps_recorded": min(self.steps, self.eplb.window_steps), "ep_size": self.state.ep_size}
        history = torch.stack(self.history) if self.history else None
        return LoadStats(self._group_load(), meta, self._group_received(), history)

    def dump(self, path: str) -> None:
        stats = self.stats()  # collective: every rank calls it
        if self.state.is_leader:
            save_stats(path, stats)
            log.info("EPLB: wrote load statistics to %s", path)

    # rebalancing ------------------------------------------------------------------------------------------
    def rebalance(self, last_step_rows: torch.Tensor | None = None) -> dict:
        load = self._group_load()
        last = self.recorder.last_received() if last_step_rows is None else last_step_rows
        rows = self._group_received(last).float()  # [R, 2, L]: rows each rank received, window and last step
        received, step_rows = rows[:, 0], rows[:, 1]
        self.balancedness = {"window": balancedness(received.t()).tolist(),
                             "step": balancedness(step_rows.t()).tolist()}
        achieved = float(balancedness(received.t()).mean())
        rank_rows = received.sum(1)  # rows each rank's experts processed over the window
        self.history = [*self.history, load][-self.eplb.history_windows:]
        old = self._placement()
        if old is None:  # one rank, no redundant slots: nothing to place
            return {"step": self.steps, "achieved": achieved, "switched": False}
        new = plan_placement(torch.stack(self.history), self.eplb, self.state, self.model_cfg, old)
        ranks = self.state.ep_size
        predicted_old = float(balancedness(gpu_loads(load, old.phy2log_LP, old.logcnt_LE, ranks)).mean())
        predicted_new = float(balancedness(gpu_loads(load, new.phy2log_LP, new.logcnt_LE, ranks)).mean())
        changed = [layer + new.first_layer for layer in range(new.phy2log_LP.shape[0])
                   if not torch.equal(new.phy2log_LP[layer], old.phy2log_LP[layer])]
        record = {"step": self.steps, "achieved": achieved, "predicted_old": predicted_old,
                  "predicted_new": predicted_new, "switched": bool(changed), "layers": len(changed),
                  "bytes_moved": 0, "switch_s": 0.0,
                  "max_rank_rows": int(rank_rows.max()), "mean_rank_rows": float(rank_rows.mean())}
        self.rebalances.append(record)
        log.info("EPLB step %d: window rows per rank max %d, mean %.1f", self.steps, record["max_rank_rows"],
                 record["mean_rank_rows"])
        if not changed:
            log.info("EPLB step %d: skip (balancedness now %.3f measured, %.3f predicted on the window; no layer "
                     "gains more than eplb.min_gain=%g + eplb.move_cost=%g x its moves)", self.steps, achieved,
                     predicted_old, self.eplb.min_gain, self.eplb.move_cost)
            return record
        log.info("EPLB step %d: replanning %d layers; balancedness %.3f measured, predicted on the window %.3f -> "
                 "%.3f", self.steps, len(changed), achieved, predicted_old, predicted_new)
        self._pending = (new, changed)
        self._advance()
        return record

    def _advance(self) -> None:
        """Moves the next chunk of changed layers and switches their maps."""
        target, layers = self._pending
        chunk = layers[: self.eplb.layers_per_step or len(layers)]
        current = self._placement()
        rows = current.phy2log_LP.clone()
        for layer in chunk:
            rows[layer - current.first_layer] = target.phy2log_LP[layer - target.first_layer]
        step_target = ExpertPlacement.from_phy2log(rows, current.num_logical, current.num_ranks, current.first_layer)
        t0 = time.perf_counter()
        received, group_bytes = self._move_weights(current, step_target)
        self.dispatcher.placement = step_target
        self._pending = (target, layers[len(chunk):]) if len(chunk) < len(layers) else None
        self.bytes_moved += group_bytes
        record = self.rebalances[-1]
        record["bytes_moved"] += group_bytes
        record["switch_s"] += time.perf_counter() - t0
        log.info("EPLB step %d: switched placement of layers %s; moved %.1f MiB over the group (%.1f MiB to this "
                 "rank) in %.3f s%s", self.steps, chunk, group_bytes / 2**20, received / 2**20,
                 time.perf_counter() - t0, "" if self._pending is None else f", {len(self._pending[1])} layers to go")

    def _move_weights(self, old: ExpertPlacement, new: ExpertPlacement) -> tuple[int, int]:
        """Fetches the experts of every changed slot from a rank that holds them now; returns (bytes received
        by this rank, bytes sent between ranks in all). Every rank computes the same plan, so sends and
        receives pair up in order."""
        me, ranks, slots = self.state.rank, self.state.ep_size, new.slots_per_rank
        moved = group = 0
        for layer, experts in self._experts.items():
            row_old = old.phy2log_LP[layer - old.first_layer].tolist()
            row_new = new.phy2log_LP[layer - new.first_layer].tolist()
            holders: dict[int, list[int]] = {}
            for p, e in enumerate(row_old):
                holders.setdefault(e, []).append(p)
            plan = []  # (destination slot, source slot), global slot ids
            for p, e in enumerate(row_new):
                if row_old[p] != e:
                    same_rank = [q for q in holders[e] if q // slots == p // slots]
                    plan.append((p, (same_rank or holders[e])[0]))
            if not plan:
                continue
            # Per-slot tensors as raw bytes: FP8 weights and their scales move exactly, on any backend.
            tensors = [t.view(torch.uint8) for t in experts.slot_tensors()]
            group += sum(t[0].numel() for t in tensors) * sum(src // slots != dst // slots for dst, src in plan)
            ops, incoming = [], []
            for dst, src in plan:
                if src // slots == me and dst // slots != me:
                    ops += [dist.P2POp(dist.isend, t[src % slots].contiguous(), dst // slots, group=self.state.group)
                            for t in tensors]
                if dst // slots == me:
                    if src // slots == me:
                        incoming.append((dst % slots, [t[src % slots].clone() for t in tensors]))
                    else:
                        bufs = [torch.empty_like(t[0]) for t in tensors]
                        ops += [dist.P2POp(dist.irecv, b, src // slots, group=self.state.group) for b in bufs]
                        incoming.append((dst % slots, bufs))
                        moved += sum(b.numel() for b in bufs)
            if ops and ranks > 1:
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
            with torch.no_grad():
                for slot, values in incoming:
                    for t, value in zip(tensors, values):
                        t[slot].copy_(value)
            experts.expert_ids = new.rank_experts(me, layer)
        return moved, group


def make_eplb_manager(eplb: EplbConfig, state: ParallelState, model_cfg: ModelConfig, model: torch.nn.Module,
                      dispatcher: Dispatcher) -> EplbManager | None:
    """A recorder attached to the dispatcher and the manager driving it, when eplb.enabled."""
    if not eplb.enabled:
        return None
    recorder = ExpertLoadRecorder(model_cfg.num_expert_layers, model_cfg.n_routed_experts, eplb.window_steps,
                                  model_cfg.first_k_dense_replace, state.device)
    dispatcher.load_recorder = recorder
    return EplbManager(eplb, state, model_cfg, model, dispatcher, recorder)
