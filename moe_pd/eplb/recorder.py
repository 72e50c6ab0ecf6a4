"""Expert load recorder: per MoE layer, tokens routed to each logical expert, over a sliding window.

Legend: W window steps, L MoE layers, E logical experts. Counting is a scatter_add on the device that
holds the routing ids (no host sync per step); the window is a ring of W per-step count tables. Received
row counts per layer (this rank's expert work) are kept on the host, where the dispatcher knows them.
Files: safetensors with `expert_load` [L, E] (and `rank_recv_rows` [R, L] when gathered, and
`expert_load_history` [T, L, E] when the online planner kept windows), JSON metadata under the key "moe_pd".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


@dataclass
class LoadStats:
    expert_load_LE: torch.Tensor
    meta: dict
    rank_recv_rows_RL: torch.Tensor | None = None
    load_history_TLE: torch.Tensor | None = None
    """The windows the online planner kept (one per rebalance check, oldest first), when it ran."""


class ExpertLoadRecorder:
    def __init__(self, num_layers: int, num_experts: int, window: int, first_layer: int = 0,
                 device: torch.device | str = "cpu") -> None:
        self.num_experts, self.window, self.first_layer = num_experts, window, first_layer
        self.counts_WLE = torch.zeros(window, num_layers, num_experts + 1, dtype=torch.int64, device=device)
        self.recv_WL = torch.zeros(window, num_layers, dtype=torch.int64)
        self.step = 0
        self._ones: torch.Tensor | None = None

    @property
    def slot(self) -> int:
        return self.step % self.window

    def begin_step(self) -> None:
        """Moves to the next step; the oldest step of the window is overwritten."""
        self.step += 1
        self.counts_WLE[self.slot].zero_()
        self.recv_WL[self.slot].zero_()

    def record(self, layer: int, topk_ids_TK: torch.Tensor) -> None:
        ids = torch.where(topk_ids_TK >= 0, topk_ids_TK, self.num_experts).reshape(-1)
        self.counts_WLE[self.slot, layer - self.first_layer].scatter_add_(0, ids, torch.ones_like(ids))

    def record_received(self, layer: int, rows: int) -> None:
        self.recv_WL[self.slot, layer - self.first_layer] += rows

    def window_load(self) -> torch.Tensor:
        """Tokens per logical expert over the window: [L, E] (this rank's share)."""
        return self.counts_WLE.sum(0)[:, : self.num_experts]

    def window_received(self) -> torch.Tensor:
        return self.recv_WL.sum(0)

    def last_received(self) -> torch.Tensor:
        """Rows this rank received per layer in the last completed step: [L]."""
        return self.recv_WL[(self.step - 1) % self.window].clone()


def save_stats(path: str | Path, stats: LoadStats) -> None:
    tensors = {"expert_load": stats.expert_load_LE.cpu().contiguous()}
    if stats.rank_recv_rows_RL is not None:
        tensors["rank_recv_rows"] = stats.rank_recv_rows_RL.cpu().contiguous()
    if stats.load_history_TLE is not None:
        tensors["expert_load_history"] = stats.load_history_TLE.cpu().contiguous()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"moe_pd": json.dumps(stats.meta)})


def load_stats(path: str | Path) -> LoadStats:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EPLB statistics file {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("moe_pd", "{}"))
        load = f.get_tensor("expert_load")
        recv = f.get_tensor("rank_recv_rows") if "rank_recv_rows" in f.keys() else None
        history = f.get_tensor("expert_load_history") if "expert_load_history" in f.keys() else None
    return LoadStats(load, meta, recv, history)
