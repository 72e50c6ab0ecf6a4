"""Moves pages between one rank's device cache and the node's tiers: offers down, promotions up.

The rank's engine calls three things, all keyed by the entries (key, parent key, tokens) the block
manager derives for its full pages:

- `lookup(entries)`: which tier holds each page of the leading run beyond the device's own prefix cache
  (no data moves; the scheduler sizes an admission by it).
- `offer(pages)`: device pages whose latents are final (write-through: when a page fills; write-back:
  when the device evicts it). The copy out of the device is issued at once, in stream order before any
  later step can overwrite the page, into the page's DRAM slot (into a private buffer when there is no
  DRAM tier). On the tier thread the DRAM slots become readable (CUDA) and the pages are written through
  to disk in batches, so the disk holds everything DRAM does and a DRAM eviction loses nothing.
- `promote(pages)` -> Promotion: copies tier pages into device pages the block manager allocated,
  on the tier thread (a disk page goes through a DRAM slot, so other ranks then hit it in DRAM too).
  The scheduler carries on; `Promotion.wait()` later says how many leading pages arrived intact. The
  rest are recomputed, so a page reclaimed or damaged on the way costs a recompute, never a wrong token.

Writing through to disk (rather than demoting from DRAM when it fills) keeps the disk complete whatever
the timing: a demoter that falls behind a fast producer would have to drop pages DRAM evicts before
they reach disk. The disk sees every page once either way; a backlog past `max_disk_backlog` pages is
dropped (counted) rather than queued without bound; pages waiting for their disk write are held in DRAM
(leased, at most half the pool), so a fast producer cannot evict them before the disk has them.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import queue
import shutil
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import torch

from moe_pd.kvcache.paged import PagedLatentCache
from moe_pd.kvcache.tiers.disk_store import DiskStore, Entry
from moe_pd.kvcache.tiers.host_pool import WRITE_LEASE_S, HostPool, SlotRef
from moe_pd.kvcache.tiers.identity import ModelIdentity
from moe_pd.kvcache.tiers.promotion import Promotion
from moe_pd.kvcache.tiers.stats import TierStats

log = logging.getLogger(__name__)
PROMOTE, COMMIT, WRITE, FLUSH, STOP = 0, 1, 2, 8, 9
"""Tier-thread job priorities: a promotion never waits behind writes."""


class TierManager:
    def __init__(self, cache: PagedLatentCache, identity: ModelIdentity, host_bytes: int, host_path: str,
                 disk_dir: str, disk_bytes: int, lease_s: float = 10.0, max_disk_backlog: int = 4096) -> None:
        self.cache, self.identity, self.lease_s = cache, identity, lease_s
        kv = cache.kv_LPSW
        num_layers, _, block_size, width = kv.shape
        self.page_shape = (num_layers, block_size, width)
        self.page_bytes = num_layers * block_size * width * kv.element_size()
        self.cuda = kv.device.type == "cuda"
        self.stats = TierStats()
        digest = identity.digest
        self.host: HostPool | None = None
        self.host_NLSW: torch.Tensor | None = None
        num_slots = host_bytes // self.page_bytes
        if num_slots > 0:
            path = host_path or f"/dev/shm/moe_pd_kv_{digest.hex()[:16]}"
            self.host = HostPool(path, num_slots, self.page_bytes, block_size, digest)
            num_slots = self.host.num_slots  # a pool another process made keeps its size
            if self.cuda:
                self.host.allocate_all()  # pinning maps every page; take them now, never SIGBUS later
            flat = torch.frombuffer(self.host.data(), dtype=torch.uint8, count=num_slots * self.host.slot_stride)
            self.host_NLSW = flat.view(num_slots, -1)[:, : self.page_bytes].view(kv.dtype).view(num_slots,
                                                                                                *self.page_shape)
            if self.cuda:
                torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), flat.numel(), 0)
        self.disk = (DiskStore(disk_dir, digest, identity.describe(), disk_bytes, self.page_bytes, block_size)
                     if disk_dir else None)
        self.stream = torch.cuda.Stream(kv.device) if self.cuda else None
        # pages waiting for disk stay held in DRAM: at most half the pool
        self.max_disk_backlog = min(max_disk_backlog, num_slots // 2) if num_slots > 0 else max_disk_backlog
        self._backlog = 0
        self._stored: dict[str, deque[bytes]] = {"dram": deque(), "disk": deque(self.disk.keys() if self.disk else ())}
        """Keys written since the last take_events; at start, what the disk already holds (a restart's routers
        learn it from the first report)."""
        host_name = socket.gethostname()
        self.domains = {"dram": f"{host_name}:{self.host.path}" if self.host else "",
                        "disk": f"{host_name}:{os.path.realpath(self.disk.dir)}" if self.disk else ""}
        """Where each tier lives, named so that every process sharing it names it alike (the routers learn
        which instances share a node's tiers from these)."""
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._thread = threading.Thread(target=self._run, name="kv-tiers", daemon=True)
        self._thread.start()
        atexit.register(_close_at_exit, weakref.ref(self))  # the last process out removes the DRAM pool
    @property
    def enabled(self) -> bool:
        return self.host is not None or self.disk is not None

    # lookups --------------------------------------------------------------------------------------------
    def _locate(self, entries: Sequence[Entry], lease_s: float) -> tuple[list[str], list[SlotRef | None]]:
        sources: list[str] = []
        refs: list[SlotRef | None] = []
        while len(sources) < len(entries):
            run = self.host.lookup(entries[len(sources) :], lease_s) if self.host else []
            sources += ["dram"] * len(run)
            refs += run
            i = len(sources)
            if i == len(entries):
                break
            if not (self.disk and self.disk.contains(entries[i : i + 1])):
                break
            sources.append("disk")
            refs.append(None)
        return sources, refs

    def lookup(self, entries: Iterable[Entry], chunk: int = 32) -> list[tuple[str, Entry]]:
        """(tier, entry) for each page of the leading run of `entries` held below the device, "dram" or
        "disk". `entries` may be lazy (BlockManager.tier_entries): keys are derived a chunk at a time and
        no further than the first miss."""
        hits: list[tuple[str, Entry]] = []
        it = iter(entries)
        while self.enabled and (batch := list(itertools.islice(it, chunk))):
            sources, _ = self._locate(batch, 0.0)
            hits += zip(sources, batch)
            if len(sources) < len(batch):
                break
        for tier in {t for t, _ in hits}:
            self.stats.add("lookup_pages", sum(t == tier for t, _ in hits), tier=tier)
        return hits

    # offers ---------------------------------------------------------------------------------------------
    def offer(self, pages: Sequence[tuple[int, Entry]]) -> None:
        """Device pages (page id, entry) whose latents are final; copies them out before returning on CPU,
        in stream order on CUDA (so a later step that reuses a page cannot overwrite them first)."""
        if not pages or not self.enabled:
            return
        self.stats.add("offered_pages", len(pages))
        if self.host is not None:
            refs_all = self.host.reserve([entry for _, entry in pages])
            todo = [(page, ref) for (page, _), ref in zip(pages, refs_all) if ref is not None]
            if not todo:
                return
            copied = self._copy_out([page for page, _ in todo], [self.host_NLSW[ref.slot] for _, ref in todo])
            refs = [ref for _, ref in todo]
            entries = [entry for (_, entry), ref in zip(pages, refs_all) if ref is not None]
            hold = 0.0
            if self.disk is not None and self._admit_backlog(len(refs)):
                # held in DRAM until written through: a fast producer cannot evict them before the disk has them
                hold = time.monotonic() + WRITE_LEASE_S
                held = [SlotRef(ref.slot, ref.gen, hold) for ref in refs]
            keys = [entry[0] for entry in entries]
            if copied is None:
                self._commit(refs, keys, None, hold)  # copied already: readable at once
            else:
                self._submit(COMMIT, lambda: self._commit(refs, keys, copied, hold))
            if hold:
                self._submit(WRITE, lambda: self._write_from_dram(entries, held))
        else:
            if not self._admit_backlog(len(pages)):
                return
            staging = torch.empty((len(pages), *self.page_shape), dtype=self.cache.kv_LPSW.dtype,
                                  pin_memory=self.cuda)
            copied = self._copy_out([page for page, _ in pages], list(staging))
            items = [(entry, _bytes(staging[i])) for i, (_, entry) in enumerate(pages)]
            self._submit(WRITE, lambda: (_sync(copied), self._write_disk(items)))

    def _admit_backlog(self, n: int) -> bool:
        with self.stats._lock:
            if self._backlog + n > self.max_disk_backlog:
                self.stats.disk_backlog_dropped += n
                return False
            self._backlog += n
            return True

    def _disk_write(self, items: list[tuple[Entry, memoryview]]) -> None:
        done = self.disk.write(items)
        self.stats.add("disk_writes", sum(done))
        self._stored["disk"].extend(entry[0] for (entry, _), ok in zip(items, done) if ok)

    def _write_disk(self, items: list[tuple[Entry, memoryview]]) -> None:
        try:
            self._disk_write(items)
        finally:
            with self.stats._lock:
                self._backlog -= len(items)

    def _write_from_dram(self, entries: list[Entry], refs: list[SlotRef]) -> None:
        """Writes pages through from the DRAM slots that hold them: copied out, then checked, so a slot
        reclaimed meanwhile (its hold ran out) never puts another page's bytes on disk under this key."""
        try:
            copies = self.host_NLSW[torch.tensor([ref.slot for ref in refs])]  # indexing copies
            valid = self.host.validate(refs)
            self._disk_write([(entry, _bytes(copies[i])) for i, (entry, ok) in enumerate(zip(entries, valid)) if ok])
        finally:
            self.host.release(refs)
            with self.stats._lock:
                self._backlog -= len(refs)

    def _copy_out(self, pages: list[int], targets: list[torch.Tensor]) -> torch.cuda.Event | None:
        kv = self.cache.kv_LPSW
        if not self.cuda:
            for page, target in zip(pages, targets):
                target.copy_(kv[:, page])
            return None
        # gathered on the compute stream, so it reads the pages before any later kernel can write them
        gathered = kv[:, torch.tensor(pages, device=kv.device)].transpose(0, 1).contiguous()
        self.stream.wait_stream(torch.cuda.current_stream(kv.device))
        with torch.cuda.stream(self.stream):
            for i, target in enumerate(targets):
                target.copy_(gathered[i], non_blocking=True)
            gathered.record_stream(self.stream)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def _commit(self, refs: list[SlotRef], keys: list[bytes], copied: torch.cuda.Event | None,
                hold_until: float = 0.0) -> None:
        _sync(copied)
        ok = self.host.commit(refs, hold_until)
        self._stored["dram"].extend(key for key, done in zip(keys, ok) if done)
        self.stats.add("dram_writes", sum(ok))
        self.stats.add("dram_write_failures", len(ok) - sum(ok))

    # promotions -----------------------------------------------------------------------------------------
    def promote(self, pages: Sequence[tuple[int, Entry]]) -> Promotion:
        """Starts copying the leading run of `pages` (device page id, entry) found in the tiers into those
        device pages; the sequence's other work goes on meanwhile (see Promotion.wait)."""
        sources, refs = self._locate([entry for _, entry in pages], self.lease_s) if self.enabled else ([], [])
        promotion = Promotion(pages[: len(sources)], sources, refs, self.host, self.stats)
        if sources:
            issued = None
            if self.cuda:  # the pages' earlier owners may still have kernels writing them on the compute stream
                issued = torch.cuda.Event()
                issued.record(torch.cuda.current_stream(self.cache.kv_LPSW.device))
            self._submit(PROMOTE, lambda: self._load(promotion, issued))
        return promotion

    def _load(self, promotion: Promotion, issued: torch.cuda.Event | None) -> None:
        kv = self.cache.kv_LPSW
        try:
            if issued is not None:
                self.stream.wait_event(issued)
            with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
                for i, (page, entry) in enumerate(promotion.pages):
                    source = self._source(promotion, i, entry)
                    if source is None:
                        break
                    kv[:, page].copy_(source, non_blocking=self.cuda)
                    promotion.copied[i] = True
                if self.cuda:
                    promotion._event = torch.cuda.Event()
                    promotion._event.record(self.stream)
        finally:
            promotion.copies_ended = time.perf_counter()  # CUDA: issued (the event says when they land)
            promotion._done.set()

    def _source(self, promotion: Promotion, i: int, entry: Entry) -> torch.Tensor | None:
        """The host tensor page i is copied from: its DRAM slot, or a disk read staged through DRAM (or a
        private buffer when there is no DRAM tier). None when the page cannot be had."""
        if promotion.sources[i] == "dram":
            return self.host_NLSW[promotion.refs[i].slot]
        if self.host is not None:
            ref = self.host.reserve([entry])[0]
            if ref is not None:
                ok = self.disk.read(entry, _bytes(self.host_NLSW[ref.slot]))
                if not (ok and self.host.commit([ref])[0]):
                    self.host.abort([ref])
                    return None
                self.stats.add("dram_writes")
                self._stored["dram"].append(entry[0])
            run = self.host.lookup([entry], self.lease_s)  # leased, and validated like any DRAM page
            promotion.refs[i] = run[0] if run else None
            return self.host_NLSW[run[0].slot] if run else None
        buffer = torch.empty(self.page_shape, dtype=self.cache.kv_LPSW.dtype, pin_memory=self.cuda)
        if not self.disk.read(entry, _bytes(buffer)):
            return None
        promotion._keep.append(buffer)
        return buffer

    # tier thread ----------------------------------------------------------------------------------------
    def _submit(self, priority: int, job: Callable[[], object]) -> None:
        self._jobs.put((priority, next(self._order), job))

    def _run(self) -> None:
        if self.cuda:
            torch.cuda.set_device(self.cache.kv_LPSW.device)
        while True:
            priority, _, job = self._jobs.get()
            if priority == STOP:
                return
            try:
                job()
            except Exception:  # a tier failure costs hits, never the rank
                log.exception("KV tier job failed")

    def flush(self, timeout: float = 30.0) -> None:
        """Waits until every job submitted so far has run (tests and shutdown)."""
        done = threading.Event()
        self._submit(FLUSH, done.set)
        if not done.wait(timeout):
            raise TimeoutError(f"KV tier jobs still running after {timeout} s")

    def take_events(self) -> dict[str, tuple[list[bytes], list[bytes]]]:
        """tier -> (keys this process stored there, keys it evicted or found damaged there) since the last
        call: the tiers' part of the cache events a router learns from."""
        removed = {"dram": self.host.evicted_keys if self.host else deque(),
                   "disk": self.disk.removed_keys if self.disk else deque()}
        return {tier: (_drain(self._stored[tier]), _drain(removed[tier])) for tier in ("dram", "disk")
                if self.domains[tier]}

    def usage(self) -> dict[str, dict[str, int]]:
        """Bytes and entries per tier (DRAM: the node's pool; disk: the whole directory)."""
        out = {}
        if self.host is not None:
            taken = self.host.num_slots - self.host.counts()["free"]
            out["dram"] = {"bytes": taken * self.page_bytes, "entries": taken}
        if self.disk is not None:
            used, entries = self.disk.usage()
            out["disk"] = {"bytes": used, "entries": entries}
        return out

    def close(self) -> None:
        if self._thread.is_alive():
            self.flush()
            self._submit(STOP, lambda: None)
            self._thread.join(timeout=30)
        if self.host is not None:
            if self.cuda:
                torch.cuda.cudart().cudaHostUnregister(self.host_NLSW.data_ptr())
            self.host_NLSW = None
            self.host.close()
            self.host = None
        if self.disk is not None:
            self.disk.close()
            self.disk = None


def host_tier_bytes(gib: float, device_pool_bytes: int, local_ranks: int, path: str) -> int:
    """kvcache.host_tier_gib in bytes; -1 is twice the device pools of the node's ranks (SGLang's
    default host-to-device ratio), at most half the free space of the file system under `path`."""
    if gib >= 0:
        return int(gib * (1 << 30))
    free = shutil.disk_usage(path or "/dev/shm").free
    return min(2 * device_pool_bytes * local_ranks, free // 2)


def _drain(q: deque) -> list:
    """Takes what is in a deque other threads append to (append and popleft are atomic)."""
    return [q.popleft() for _ in range(len(q))]


def _close_at_exit(ref: weakref.ref) -> None:
    manager = ref()
    if manager is not None:
        try:
            manager.close()
        except Exception:  # exiting anyway
            log.exception("closing the KV tiers at exit failed")


def _bytes(t: torch.Tensor) -> memoryview:
    """A contiguous host tensor's bytes, writable, without a copy."""
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def _sync(event: torch.cuda.Event | None) -> None:
    if event is not None:
        event.synchronize()
