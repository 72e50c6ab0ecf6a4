"""Expert-parallel load balancer schema."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from moe_pd.config.errors import check, check_choice


@dataclass
class EplbConfig:
    """Records expert load, places redundant replicas from it, and rebalances while serving."""

    enabled: bool = False
    """Record per-expert load every step (on device, no host sync) and allow rebalancing."""
    routing: str = "static"
    """How a logical expert's tokens pick among its replicas: 'static' (fixed by the (token, k) position),
    'dynamic' (spread evenly over the replicas within each rank's batch) or 'balanced' (split so that the
    step's per-GPU load is level, from the gate's counts summed over the EP group; eplb/replica_routing.py)."""
    policy: str = "ours"
    """Placement policy: 'ours' (local search, never worse than DeepSeek's) or 'deepseek'."""
    num_nodes: int = 1
    """Nodes the EP group spans; groups are kept inside a node when model.n_group divides over them."""
    window_steps: int = 64
    """Steps of load history a rebalance plans from."""
    rebalance_every: int = 0
    """Steps between rebalance checks; 0 never rebalances online."""
    min_gain: float = 0.01
    """A layer is replanned only if its expected next-window balancedness (mean / max GPU load) rises by
    more than this plus the move cost."""
    move_cost: float = 0.02
    """Balancedness a layer must gain to pay for fetching all its slots (scaled by the fraction fetched)."""
    history_windows: int = 8
    """Load windows (one per rebalance check) the planner forecasts the next window from."""
    layers_per_step: int = 0
    """Move the weights of at most this many layers per step, switching each chunk's maps as it lands,
    so a rebalance never stalls one step for long; 0 moves every changed layer at once."""
    init_from: Optional[str] = None
    """Load statistics file (from `dump_stats`) to plan the initial placement from."""
    dump_stats: Optional[str] = None
    """Write the recorded window (safetensors + JSON metadata) here when the run ends."""

    def __post_init__(self) -> None:
        check_choice("eplb.routing", self.routing, ("static", "dynamic", "balanced"))
        check_choice("eplb.policy", self.policy, ("ours", "deepseek"))
        check(self.num_nodes > 0, "eplb.num_nodes", self.num_nodes, "must be > 0")
        check(self.window_steps > 0, "eplb.window_steps", self.window_steps, "must be > 0")
        check(self.move_cost >= 0, "eplb.move_cost", self.move_cost, "must be >= 0")
        check(self.history_windows > 0, "eplb.history_windows", self.history_windows, "must be > 0")
        check(self.layers_per_step >= 0, "eplb.layers_per_step", self.layers_per_step, "must be >= 0 (0: all)")
        check(self.rebalance_every >= 0, "eplb.rebalance_every", self.rebalance_every, "must be >= 0 (0: never)")
        check(self.rebalance_every == 0 or self.enabled, "eplb.rebalance_every", self.rebalance_every,
              "needs eplb.enabled=true (rebalancing plans from recorded load)")
