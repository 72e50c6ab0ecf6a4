"""Pages between a rank's device cache and the tiers, driven the way the engine drives them: the block
manager names the pages, the TierManager offers them down and promotes them back (CPU tensors)."""

import multiprocessing
import threading
import time

import pytest
import torch

from moe_pd.kvcache.block_manager import BlockManager
from moe_pd.kvcache.paged import PagedLatentCache
from moe_pd.kvcache.tiers import host_pool as host_pool_module
from moe_pd.kvcache.tiers.host_pool import HostPool
from moe_pd.kvcache.tiers.identity import ModelIdentity, chain_keys
from moe_pd.kvcache.tiers.manager import TierManager

BS, PAGES = 4, 8
IDENTITY = ModelIdentity(config="tiny", weights="random:0", dtype="float32", kv_layout="mla:L=2:row=8+4:LSW",
                         block_size=BS)
PROMPT = list(range(100, 125))  # 6 full pages and one token


def page_data(key: bytes) -> torch.Tensor:
    """What 'the model' writes into a page: a function of the page's key (its whole prefix)."""
    gen = torch.Generator().manual_seed(int.from_bytes(key[:7], "little"))
    return torch.randn(2, BS, 12, generator=gen)


def setup(tmp_path, host_slots=16, disk=False, identity=IDENTITY, name="pool", **kw):
    cache = PagedLatentCache(2, PAGES, BS, 8, 4)
    alloc = BlockManager(PAGES, BS, tier_root=identity.digest)
    page_bytes = 2 * BS * 12 * 4
    tiers = TierManager(cache, identity, host_slots * page_bytes, str(tmp_path / name),
                        str(tmp_path / "disk") if disk else "", 1 << 20, **kw)
    return cache, alloc, tiers


def prefill(cache, alloc, tokens) -> list[int]:
    """Admits and 'computes' a sequence: its new full pages get page_data(key) and are registered."""
    hits = alloc.cached_prefix(tokens)
    table, hit_tokens = alloc.admit(tokens, len(tokens), hits)
    for i, (key, _, _) in enumerate(chain_keys(alloc.tier_root, tokens, BS)):
        if i >= hit_tokens // BS:
            cache.kv_LPSW[:, table[i]] = page_data(key)
    alloc.commit(table, tokens, len(tokens))
    return table


def evict_everything(cache, alloc, table):
    alloc.free(table)
    filler = prefill(cache, alloc, list(range(5000, 5000 + PAGES * BS)))  # takes every page
    alloc.free(filler)


def revisit(cache, alloc, tiers, tokens) -> tuple[int, list[int], list[str]]:
    """A new sequence with `tokens`: device hits, then the tiers' hits promoted. Returns (pages served
    from the tiers, block table, their tiers)."""
    hits = alloc.cached_prefix(tokens)
    found = tiers.lookup(alloc.tier_entries(tokens, hits))
    table, _ = alloc.admit(tokens, len(tokens), hits)
    promotion = tiers.promote([(table[len(hits) + i], entry) for i, (_, entry) in enumerate(found)])
    n = promotion.wait(timeout=30)
    alloc.commit(table, tokens, (len(hits) + n) * BS)
    return n, table, [tier for tier, _ in found]


def assert_pages_hold(cache, alloc, table, tokens, n):
    for i, (key, _, _) in enumerate(chain_keys(alloc.tier_root, tokens, BS)):
        if i < n:
            assert torch.equal(cache.kv_LPSW[:, table[i]], page_data(key)), f"page {i} differs"


def test_block_manager_names_new_and_evicted_pages_for_the_tiers():
    alloc = BlockManager(4, BS, tier_root=b"r" * 16)
    table, _ = alloc.admit(list(range(10)), 10)
    alloc.commit(table, list(range(10)), 10)
    expected = list(chain_keys(b"r" * 16, list(range(8)), BS))
    assert alloc.take_new_pages() == [(table[0], expected[0]), (table[1], expected[1])]
    assert alloc.take_new_pages() == []
    # a revisit continues the chain after its device hits and stops a token before the end
    tokens = list(range(17))
    assert list(alloc.tier_entries(tokens, table[:1])) == list(chain_keys(b"r" * 16, tokens, BS))[1:4]
    cached = list(zip(table[:2], expected))
    alloc.free(table)
    alloc.admit(list(range(50, 66)), 16)  # needs every page: the two cached ones are evicted
    assert sorted(alloc.take_evicted()) == sorted(cached)
    assert BlockManager(4, BS).take_new_pages() == []  # without tiers nothing is recorded


@pytest.mark.parametrize("tiers_on", ["dram", "disk", "dram+disk"])
def test_offer_then_promote_is_byte_exact(tmp_path, tiers_on):
    cache, alloc, tiers = setup(tmp_path, host_slots=0 if tiers_on == "disk" else 16, disk="disk" in tiers_on)
    table = prefill(cache, alloc, PROMPT)
    tiers.offer(alloc.take_new_pages())
    tiers.flush()
    if tiers_on == "dram+disk":
        assert tiers.stats.disk_writes == 6  # written through: the disk holds what DRAM holds
        other = HostPool(str(tmp_path / "pool"), 16, tiers.page_bytes, BS, IDENTITY.digest)
        other.commit([r for r in other.reserve(list(chain_keys(IDENTITY.digest, list(range(700, 764)), BS)))])
        other.close()  # another process's pages pushed every page of ours out of DRAM
        assert tiers.lookup(alloc.tier_entries(PROMPT, []))[0][0] == "disk"
    evict_everything(cache, alloc, table)
    assert alloc.cached_prefix(PROMPT) == []
    n, table, found = revisit(cache, alloc, tiers, PROMPT)
    assert n == 6 and set(found) == {"dram" if tiers_on == "dram" else "disk"}
    assert_pages_hold(cache, alloc, table, PROMPT, 6)
    assert len(alloc.cached_prefix(PROMPT)) == 6  # promoted pages are registered like computed ones
    if tiers_on == "dram+disk":
        assert len(tiers.lookup(alloc.tier_entries(PROMPT, []))) == 6  # staged through DRAM for everyone
        assert {t for t, _ in tiers.lookup(alloc.tier_entries(PROMPT, []))} == {"dram"}
    tiers.close()


def test_write_back_offers_pages_as_the_device_evicts_them(tmp_path):
    cache, alloc, tiers = setup(tmp_path)
    table = prefill(cache, alloc, PROMPT)
    alloc.take_new_pages()  # write-back ignores pages as they fill
    alloc.free(table)
    filler = list(range(5000, 5000 + PAGES * BS))
    taken, _ = alloc.admit(filler, len(filler))  # the scheduler's admission evicts the cached pages
    tiers.offer(alloc.take_evicted())  # offered before the step's forward overwrites them
    for i, (key, _, _) in enumerate(chain_keys(alloc.tier_root, filler, BS)):
        cache.kv_LPSW[:, taken[i]] = page_data(key)
    alloc.free(taken)
    n, table, _ = revisit(cache, alloc, tiers, PROMPT)
    assert n == 6
    assert_pages_hold(cache, alloc, table, PROMPT, 6)
    tiers.close()


def _gated(tiers: TierManager) -> threading.Event:
    """Blocks the tier thread until the returned event is set (a promotion queued meanwhile waits)."""
    gate = threading.Event()
    tiers._submit(-1, gate.wait)
    return gate


def test_a_page_promoted_while_being_evicted(tmp_path, monkeypatch):
    cache, alloc, tiers = setup(tmp_path, host_slots=6)
    table = prefill(cache, alloc, PROMPT)
    tiers.offer(alloc.take_new_pages())
    tiers.flush()
    other = HostPool(str(tmp_path / "pool"), 6, tiers.page_bytes, BS, IDENTITY.digest)  # another process
    intruders = list(chain_keys(IDENTITY.digest, list(range(900, 924)), BS))

    def promote_with(evict):
        gate = _gated(tiers)
        evict_everything(cache, alloc, table)
        hits = alloc.cached_prefix(PROMPT)
        found = tiers.lookup(alloc.tier_entries(PROMPT, hits))
        new_table, _ = alloc.admit(PROMPT, len(PROMPT), hits)
        promotion = tiers.promote([(new_table[i], e) for i, (_, e) in enumerate(found)])
        evict()  # while the promotion waits for the tier thread
        gate.set()
        return promotion.wait(timeout=30), new_table

    # the promotion's lease holds: the other process finds no slot to take
    n, table = promote_with(lambda: assert_none(other.reserve(intruders)))
    assert n == 6
    assert_pages_hold(cache, alloc, table, PROMPT, 6)
    alloc.commit(table, PROMPT, 6 * BS)

    # the lease ran out (a promotion stalled past it): the slots are reclaimed and rewritten meanwhile
    def reclaim():
        now = time.monotonic()
        monkeypatch.setattr(host_pool_module.time, "monotonic", lambda: now + 60)
        refs = other.reserve(intruders)
        assert all(r is not None for r in refs)
        other.commit(refs)

    n, table = promote_with(reclaim)
    assert n == 0 and tiers.stats.promotion_misses == 6  # detected: recomputed, never served
    other.close()
    tiers.close()


def assert_none(refs):
    assert refs == [None] * len(refs)


def test_restart_on_the_same_directory_hits_and_another_model_does_not(tmp_path):
    cache, alloc, tiers = setup(tmp_path, host_slots=0, disk=True)
    prefill(cache, alloc, PROMPT)
    tiers.offer(alloc.take_new_pages())
    tiers.close()  # the process goes away; its writes are done
    cache, alloc, tiers = setup(tmp_path, host_slots=0, disk=True)  # a new process, an empty device cache
    # its first cache events name what the disk holds, so the routers learn it without a write
    assert sorted(tiers.take_events()["disk"][0]) == sorted(e[0] for e in alloc.tier_entries(PROMPT, []))
    n, table, found = revisit(cache, alloc, tiers, PROMPT)
    assert n == 6 and found == ["disk"] * 6
    assert_pages_hold(cache, alloc, table, PROMPT, 6)
    tiers.close()
    other = ModelIdentity(config="tiny", weights="random:1", dtype="float32", kv_layout=IDENTITY.kv_layout,
                          block_size=BS)
    cache, alloc, tiers = setup(tmp_path, host_slots=0, disk=True, identity=other)
    assert revisit(cache, alloc, tiers, PROMPT)[0] == 0
    tiers.close()


def _offer_in_another_process(tmp_path, ready, done) -> None:
    cache, alloc, tiers = setup(tmp_path)
    prefill(cache, alloc, PROMPT)
    tiers.offer(alloc.take_new_pages())
    tiers.flush()
    ready.set()
    done.wait(60)
    tiers.close()


def test_two_processes_share_the_node_dram_tier(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_offer_in_another_process, args=(tmp_path, ready, done))
    proc.start()
    try:
        assert ready.wait(120), "the other process did not offer its pages"
        cache, alloc, tiers = setup(tmp_path, host_slots=32)  # never computed the prompt; asks another size
        assert tiers.host.num_slots == 16 and tiers.host_NLSW.shape[0] == 16  # joins the pool as it is
        n, table, found = revisit(cache, alloc, tiers, PROMPT)
        assert n == 6 and found == ["dram"] * 6
        assert_pages_hold(cache, alloc, table, PROMPT, 6)
        tiers.close()
    finally:
        done.set()
        proc.join(60)
    assert proc.exitcode == 0 and not (tmp_path / "pool").exists()


def test_host_tier_size_is_explicit_or_twice_the_node_device_pools_within_free_memory(tmp_path):
    from moe_pd.kvcache.tiers.manager import host_tier_bytes

    assert host_tier_bytes(0, 1 << 30, 8, str(tmp_path)) == 0  # off
    assert host_tier_bytes(1.5, 1 << 30, 8, str(tmp_path)) == 3 << 29
    free = __import__("shutil").disk_usage(tmp_path).free
    assert host_tier_bytes(-1, 1 << 20, 4, str(tmp_path)) == min(8 << 20, free // 2)
    assert host_tier_bytes(-1, free, 4, str(tmp_path)) == free // 2


def test_pages_wait_in_dram_for_their_disk_write_and_a_lapsed_hold_writes_nothing_wrong(tmp_path, monkeypatch):
    cache, alloc, tiers = setup(tmp_path, disk=True)
    other = HostPool(str(tmp_path / "pool"), 16, tiers.page_bytes, BS, IDENTITY.digest)  # another process
    intruders = list(chain_keys(IDENTITY.digest, list(range(700, 764)), BS))
    gate = _gated(tiers)  # the disk writes wait behind this
    prefill(cache, alloc, PROMPT)
    tiers.offer(alloc.take_new_pages())
    refs = other.reserve(intruders)
    assert sum(r is not None for r in refs) == 10  # 16 slots, 6 held for their disk write
    other.abort([r for r in refs if r is not None])
    gate.set()
    tiers.flush()
    assert tiers.stats.disk_writes == 6 and tiers.disk.contains(alloc.tier_entries(PROMPT, [])) == 6

    # a write stalled past its hold: the slots are taken and rewritten before the copy; nothing is written
    cache, alloc, tiers2 = setup(tmp_path, disk=True, name="pool2")
    gate = _gated(tiers2)
    prompt = list(range(300, 325))
    prefill(cache, alloc, prompt)
    tiers2.offer(alloc.take_new_pages())
    now = time.monotonic()
    monkeypatch.setattr(host_pool_module.time, "monotonic", lambda: now + 60)
    other2 = HostPool(str(tmp_path / "pool2"), 16, tiers.page_bytes, BS, IDENTITY.digest)
    other2.commit([r for r in other2.reserve(intruders)])
    gate.set()
    tiers2.flush()
    assert tiers2.stats.disk_writes == 0 and tiers2.disk.contains(alloc.tier_entries(prompt, [])) == 0
    for handle in (other, other2, tiers, tiers2):
        handle.close()
