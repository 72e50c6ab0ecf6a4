"""Balance metrics of a placement. Legend: L layers, E logical experts, P slots, G GPUs."""

from __future__ import annotations

import torch


def gpu_loads(weight_LE: torch.Tensor, phy2log_LP: torch.Tensor, logcnt_LE: torch.Tensor,
              num_gpus: int) -> torch.Tensor:
    """Predicted load per GPU [L, G]: each slot carries its expert's load / replica count."""
    per_replica_LE = weight_LE.float() / logcnt_LE.float()
    return per_replica_LE.gather(1, phy2log_LP).view(phy2log_LP.shape[0], num_gpus, -1).sum(-1)


def balancedness(loads_LG: torch.Tensor) -> torch.Tensor:
    """mean / max load per GPU, per layer (1 = perfectly balanced); an idle layer counts as balanced."""
    peak = loads_LG.max(dim=-1).values
    return torch.where(peak > 0, loads_LG.mean(dim=-1) / peak.clamp(min=1e-12), torch.ones_like(peak))


def no_replication_loads(weight_LE: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """GPU loads with experts laid out contiguously (expert e on GPU e * G // E) and no replicas."""
    layers, experts = weight_LE.shape
    owner_E = torch.arange(experts) * num_gpus // experts
    loads = torch.zeros(layers, num_gpus)
    return loads.index_add_(1, owner_E, weight_LE.float())
