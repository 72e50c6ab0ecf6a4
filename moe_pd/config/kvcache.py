"""Paged MLA latent cache schema, with the host DRAM and disk tiers below the device pages."""

from __future__ import annotations

from dataclasses import dataclass

from moe_pd.config.errors import check, check_choice

TIER_WRITE_POLICIES = ("write_through", "write_back")
TRANSFER_BACKENDS = ("auto", "zmq", "nixl")


@dataclass
class KVCacheConfig:
    """Pages of `block_size` tokens, each holding the latent and the rope key of every layer."""

    block_size: int = 16
    """Tokens per page."""
    num_blocks: int = 1024
    """Pages in the pool of one rank."""
    prefix_cache: bool = True
    """Reuse the pages of a shared prompt prefix (chained hashes over full pages, token-checked)."""
    host_tier_gib: float = -1.0
    """Host DRAM tier of the node, shared by every rank and instance of the same model on it (GiB).
    -1: twice the device pools of the node's ranks, at most half the free space of `host_tier_path`'s
    file system; 0: off."""
    host_tier_path: str = ""
    """File backing the DRAM tier (a tmpfs file, mapped by every process); empty: one per model identity
    under /dev/shm."""
    disk_tier_dir: str = ""
    """Directory of the disk tier (survives restarts; shared by every process that names it); empty: off."""
    disk_tier_gib: float = 64.0
    """Capacity of the disk tier directory (GiB); least recently used entries are removed past it."""
    tier_write_policy: str = "write_through"
    """When device pages reach the tiers: write_through (as soon as a page is full; another rank can hit
    it at once) or write_back (only when the device evicts it)."""

    transfer: str = "auto"
    """KV transfer from prefill to decode ranks: zmq (pyzmq over TCP, host-staged), nixl (NIXL over UCX,
    straight into the reserved decode pages), or auto: the backend measured faster on the cache's device
    (docs/kv_transfer.md: nixl on CPU; zmq on CUDA until a GPU measurement says otherwise), zmq when NIXL is
    not installed. Prefill and decode instances must use the same one."""
    nixl_busy_poll_ms: float = 1.0
    """NIXL: milliseconds between UCX progress rounds while data moves (this rank's transfers, or a peer's
    into this rank's pages)."""
    nixl_wait_poll_ms: float = 5.0
    """NIXL: milliseconds between progress rounds while a transfer is expected but not started (a decode
    rank's reservations): the most a transfer waits for its target to notice it."""

    def __post_init__(self) -> None:
        check_choice("kvcache.transfer", self.transfer, TRANSFER_BACKENDS)
        check(self.nixl_busy_poll_ms > 0, "kvcache.nixl_busy_poll_ms", self.nixl_busy_poll_ms, "must be > 0")
        check(self.nixl_wait_poll_ms >= self.nixl_busy_poll_ms, "kvcache.nixl_wait_poll_ms", self.nixl_wait_poll_ms,
              "must be >= kvcache.nixl_busy_poll_ms")
        check(self.block_size > 0, "kvcache.block_size", self.block_size, "must be > 0")
        check(self.num_blocks > 0, "kvcache.num_blocks", self.num_blocks, "must be > 0")
        check(self.host_tier_gib == -1.0 or self.host_tier_gib >= 0, "kvcache.host_tier_gib", self.host_tier_gib,
              "must be >= 0, or -1 for the automatic size")
        check(self.disk_tier_gib > 0, "kvcache.disk_tier_gib", self.disk_tier_gib, "must be > 0")
        check_choice("kvcache.tier_write_policy", self.tier_write_policy, TIER_WRITE_POLICIES)
