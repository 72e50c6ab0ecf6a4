"""The KV tiers of one rank from its config: the model identity the keys hang off, and the TierManager over
its device cache (or None when both tiers are off)."""

from __future__ import annotations

import logging
import os

from moe_pd.config.kvcache import KVCacheConfig
from moe_pd.kvcache.paged import PagedLatentCache
from moe_pd.kvcache.tiers.identity import ModelIdentity
from moe_pd.kvcache.tiers.manager import TierManager, host_tier_bytes
from moe_pd.runtime import dtype_name

log = logging.getLogger(__name__)


def model_identity(model_cfg, cache: PagedLatentCache) -> ModelIdentity:
    """Everything that decides the bytes of this cache's pages (moe_pd.kvcache.tiers.identity)."""
    return ModelIdentity.of(model_cfg, dtype_name(cache.kv_LPSW.dtype), cache.block_size, cache.kv_LPSW.shape[0])


def local_ranks() -> int:
    """Processes of this job on this node (torchrun's LOCAL_WORLD_SIZE; 1 outside torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def build_tiers(kv: KVCacheConfig, identity: ModelIdentity, cache: PagedLatentCache) -> TierManager | None:
    """kvcache.host_tier_* and disk_tier_* as a TierManager over `cache`; None when both are off or the
    prefix cache is (a tier is a cache of prefixes)."""
    if not kv.prefix_cache:
        return None
    page_bytes = cache.kv_LPSW[:, 0].numel() * cache.kv_LPSW.element_size()
    host = host_tier_bytes(kv.host_tier_gib, page_bytes * kv.num_blocks, local_ranks(),
                           os.path.dirname(kv.host_tier_path) or "/dev/shm")
    if host < page_bytes and not kv.disk_tier_dir:
        return None
    tiers = TierManager(cache, identity, host, kv.host_tier_path, kv.disk_tier_dir, int(kv.disk_tier_gib * (1 << 30)))
    dram = f"{tiers.host.num_slots} pages at {tiers.host.path}" if tiers.host else "off"
    log.info("KV tiers: DRAM %s, disk %s", dram, kv.disk_tier_dir or "off")
    return tiers
