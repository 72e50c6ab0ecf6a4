"""The node's host DRAM tier: a pool of page slots in one shared file, mapped by every process (no torch).

Every rank and instance of one model on a node maps the same tmpfs file (Mooncake's store and vLLM's
shared offload region pool host memory the same way): a header, the slots' metadata, a hash table from
page key to slot (slot_table.py) and the page bytes. Index changes happen under a file lock (`flock`, so a
process that dies releases it); page bytes are copied outside the lock:

- writing is two-phase, as Mooncake's PutStart/PutEnd: `reserve` claims a slot (WRITING, in the table so
  no other process writes the same page twice), the bytes are copied, `commit` makes it READY. A reader
  never sees a WRITING slot, so no half-written page is ever served.
- a reader `lookup`s with a lease: a leased slot is not evicted until the lease runs out, so a promotion
  in flight keeps its source. Each slot also carries a generation, bumped whenever the slot is reclaimed;
  `validate` after the copy confirms the generation is unchanged, so even a copy that outlived its lease
  is detected and treated as a miss, never served.
- eviction is least recently used among READY, unleased slots, done by the writer that needs a slot
  (with a disk tier, every page was also written through to disk, so an evicted page is still there).

A slot whose writer died keeps its lease until it expires, then is reclaimed. Times are
CLOCK_MONOTONIC, which all processes of a boot share. The last process to close the pool removes its file.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from moe_pd.kvcache.tiers.slot_table import EMPTY, SlotTable, key_words

MAGIC = b"MPDKVHP1"
HEADER_BYTES = 4096
ALIGN = 256
FREE, WRITING, READY = 0, 1, 2
WRITE_LEASE_S = 30.0
"""How long a writer may hold a slot before others may reclaim it (it died, or hangs)."""

TAIL_FIRST_S = 1e-6
"""Pages of one batch (a chain, in order) are stamped this much apart, the first as the most recent: a
chain then loses its tail first, since a page is useless once its predecessor is gone."""

Entry = tuple[bytes, bytes, Sequence[int]]
"""(page key, parent key, page tokens)."""


@dataclass(frozen=True)
class SlotRef:
    slot: int
    gen: int
    lease: float = 0.0
    """The lease this reference set (0: none); `release` ends it early."""


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class HostPool:
    def __init__(self, path: str, num_slots: int, page_bytes: int, block_size: int, identity: bytes) -> None:
        """Maps the pool at `path`, creating it with `num_slots` when absent. An existing pool of the same
        model and page format is joined whatever its size (the first process sized it); one of another
        format is replaced when nobody maps it, else this raises ValueError."""
        if num_slots <= 0 or page_bytes <= 0:
            raise ValueError(f"host pool {path}: num_slots={num_slots} and page_bytes={page_bytes} must be > 0")
        self.path, self.block_size, self.page_bytes = path, block_size, page_bytes
        self.slot_stride = _aligned(page_bytes)
        num_buckets = 1 << max(1, (2 * num_slots - 1).bit_length())
        self._shape = (num_slots, page_bytes, block_size, num_buckets, identity)
        self._tlock = threading.RLock()
        self._lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        with self._file_lock():
            self._fd = self._open_or_create()
            fcntl.flock(self._fd, fcntl.LOCK_SH)  # held while mapped: the last holder removes the file
        self._mm = mmap.mmap(self._fd, self._layout()["total"], mmap.MAP_SHARED)
        self._map_arrays()
        self.table = SlotTable(self.buckets, self.keys)
        self.allocation_failures = 0
        """Slots this process could not back with memory (the file system is full)."""
        self.evicted_keys: deque[bytes] = deque()
        """Keys of the READY pages this process evicted, until the owner takes them (cache events)."""

    # layout ---------------------------------------------------------------------------------------------
    def _layout(self) -> dict[str, int]:
        num_slots, _, block_size, num_buckets, _ = self._shape
        sizes = {"state": 4 * num_slots, "gen": 8 * num_slots, "keys": 16 * num_slots, "parents": 16 * num_slots,
                 "tokens": 8 * num_slots * block_size, "last_used": 8 * num_slots, "lease": 8 * num_slots,
                 "allocated": num_slots, "buckets": 4 * num_buckets}
        out, offset = {}, HEADER_BYTES
        for name, size in sizes.items():
            out[name] = offset
            offset = _aligned(offset + size)
        out["data"] = offset = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
        out["total"] = offset + self.slot_stride * num_slots
        return out

    def _header(self) -> bytes:
        num_slots, page_bytes, block_size, num_buckets, identity = self._shape
        fields = (page_bytes, block_size, self.slot_stride, num_slots, num_buckets)
        return MAGIC + identity + b"".join(v.to_bytes(8, "little") for v in fields)

    def _open_or_create(self) -> int:
        """Under the file lock: the existing pool if it holds our pages (adopting its size), else a new one."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return self._create()
        header, fixed = os.pread(fd, len(self._header()), 0), len(MAGIC) + 16 + 24
        if header[:fixed] == self._header()[:fixed]:
            num_slots, num_buckets = (int.from_bytes(header[i : i + 8], "little") for i in (fixed, fixed + 8))
            self._shape = (num_slots, *self._shape[1:3], num_buckets, self._shape[4])
            return fd
        try:  # another model or page format: replace it only if nobody maps it
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f"host tier {self.path} is in use by another model or page format; name "
                             f"another kvcache.host_tier_path") from None
        os.close(fd)
        return self._create()

    def _create(self) -> int:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        layout = self._layout()
        os.ftruncate(fd, layout["total"])  # sparse: tmpfs pages are taken as slots are first written
        os.pwrite(fd, self._header(), 0)
        os.pwrite(fd, b"\xff" * (4 * self._shape[3]), layout["buckets"])  # every bucket EMPTY (-1)
        os.rename(tmp, self.path)  # atomic: a process attaching sees a whole header or no file
        return fd

    def _map_arrays(self) -> None:
        num_slots, _, block_size, num_buckets, _ = self._shape
        at = self._layout()

        def view(name: str, dtype, shape) -> np.ndarray:
            count = int(np.prod(shape))
            return np.frombuffer(self._mm, dtype=dtype, count=count, offset=at[name]).reshape(shape)

        self.state = view("state", np.int32, (num_slots,))
        self.gen = view("gen", np.int64, (num_slots,))
        self.keys = view("keys", np.uint64, (num_slots, 2))
        self.parents = view("parents", np.uint64, (num_slots, 2))
        self.tokens = view("tokens", np.int64, (num_slots, block_size))
        self.last_used = view("last_used", np.float64, (num_slots,))
        self.lease = view("lease", np.float64, (num_slots,))
        self.allocated = view("allocated", np.uint8, (num_slots,))
        self.buckets = view("buckets", np.int32, (num_buckets,))
        self.data_offset = at["data"]

    @property
    def num_slots(self) -> int:
        return self._shape[0]

    def data(self) -> memoryview:
        """The page bytes of every slot: slot s at [s * slot_stride, s * slot_stride + page_bytes)."""
        return memoryview(self._mm)[self.data_offset :]

    # locking --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Threads of this process and other processes alike (flock alone does not exclude threads that
        share a file description)."""
        with self._tlock, self._file_lock():
            yield

    # reading --------------------------------------------------------------------------------------------
    def _match(self, slot: int, parent: bytes, tokens: Sequence[int]) -> bool:
        p0, p1 = key_words(parent)
        return (int(self.parents[slot, 0]) == p0 and int(self.parents[slot, 1]) == p1
                and self.tokens[slot].tolist() == list(tokens))

    def lookup(self, entries: Sequence[Entry], lease_s: float = 0.0) -> list[SlotRef]:
        """The slots holding the leading run of `entries` that are READY, each confirmed by its parent key and
        tokens. Touches them (LRU) and, with `lease_s`, leases them."""
        found = []
        with self._locked():
            for ref in self._find(entries, lease_s):
                if ref is None:
                    break
                found.append(ref)
        return found

    def find(self, entries: Sequence[Entry], lease_s: float = 0.0) -> list[SlotRef | None]:
        """lookup() for each entry on its own: None where an entry is not READY here."""
        with self._locked():
            return list(self._find(entries, lease_s))

    def _find(self, entries: Sequence[Entry], lease_s: float) -> Iterator[SlotRef | None]:
        now = time.monotonic()
        for i, (key, parent, tokens) in enumerate(entries):
            slot = self.table.find(key_words(key))
            if slot == EMPTY or self.state[slot] != READY or not self._match(slot, parent, tokens):
                yield None
                continue
            self.last_used[slot] = now - i * TAIL_FIRST_S
            until = 0.0
            if lease_s and now + lease_s > self.lease[slot]:  # a longer lease held by another stays theirs
                until = self.lease[slot] = now + lease_s
            yield SlotRef(slot, int(self.gen[slot]), until)

    def validate(self, refs: Sequence[SlotRef]) -> list[bool]:
        """Whether each slot still holds what it held when it was looked up (not reclaimed since)."""
        with self._locked():
            return [bool(int(self.gen[r.slot]) == r.gen and self.state[r.slot] == READY) for r in refs]

    def release(self, refs: Sequence[SlotRef]) -> None:
        """Ends the leases these references set, once their copies are done, so a promoted page can be
        evicted again at once. A lease another holder set later or longer is left alone (theirs)."""
        with self._locked():
            for r in refs:
                if r.lease and int(self.gen[r.slot]) == r.gen and float(self.lease[r.slot]) == r.lease:
                    self.lease[r.slot] = 0.0

    # writing --------------------------------------------------------------------------------------------
    def reserve(self, entries: Sequence[Entry]) -> list[SlotRef | None]:
        """A WRITING slot for each entry not in the pool yet (None for those already there, or when no slot
        can be had); the caller copies the page into data() and then commits or aborts."""
        now = time.monotonic()
        out: list[SlotRef | None] = []
        with self._locked():
            todo, seen = [], set()
            for i, (key, _, _) in enumerate(entries):
                slot = self.table.find(key_words(key))
                if slot != EMPTY:
                    self.last_used[slot] = now - i * TAIL_FIRST_S
                out.append(None)
                if slot == EMPTY and key not in seen:
                    todo.append(i)
                    seen.add(key)
            slots = self._claim(len(todo), now)
            for i, slot in zip(todo, slots):
                if not self._allocate(slot):
                    continue
                key, parent, tokens = entries[i]
                words = key_words(key)
                self.keys[slot] = words
                self.parents[slot] = key_words(parent)
                self.tokens[slot] = tokens
                self.state[slot], self.lease[slot] = WRITING, now + WRITE_LEASE_S
                self.last_used[slot] = now - i * TAIL_FIRST_S
                self.gen[slot] += 1
                self.table.insert(words, slot)
                out[i] = SlotRef(slot, int(self.gen[slot]))
        return out

    def _claim(self, n: int, now: float) -> list[int]:
        """Up to n slots: free ones first, then the least recently used READY unleased ones (dropped),
        then WRITING ones whose writer let the lease lapse."""
        if n == 0:
            return []
        free = np.flatnonzero(self.state == FREE)[:n].tolist()
        if len(free) < n:
            free += self._evict(n - len(free), now, (READY,))
        if len(free) < n:
            free += self._evict(n - len(free), now, (WRITING,))
        return free

    def _evict(self, n: int, now: float, states: tuple[int, ...]) -> list[int]:
        candidates = np.flatnonzero(np.isin(self.state, states) & (self.lease < now))
        if candidates.size > n:
            candidates = candidates[np.argpartition(self.last_used[candidates], n - 1)[:n]]
        chosen = candidates[np.argsort(self.last_used[candidates], kind="stable")].tolist()
        for slot in chosen:
            if self.state[slot] == READY:
                self.evicted_keys.append(self.keys[slot].tobytes())
            self._free(slot)
        return chosen

    def _free(self, slot: int) -> None:
        self.table.delete((int(self.keys[slot, 0]), int(self.keys[slot, 1])))
        self.state[slot] = FREE
        self.gen[slot] += 1
        self.lease[slot] = 0.0

    def _allocate(self, slot: int) -> bool:
        """Takes the slot's memory from the file system before its first write, so a full tmpfs refuses the
        slot here (ENOSPC) instead of killing the writer with SIGBUS through the mapping."""
        if not self.allocated[slot]:
            try:
                os.posix_fallocate(self._fd, self.data_offset + slot * self.slot_stride, self.slot_stride)
            except OSError:
                self.allocation_failures += 1
                return False
            self.allocated[slot] = 1
        return True

    def allocate_all(self) -> None:
        """Backs every slot with memory now (before pinning the whole mapping); OSError when it cannot."""
        with self._locked():
            os.posix_fallocate(self._fd, self.data_offset, self.slot_stride * self.num_slots)
            self.allocated[:] = 1

    def commit(self, refs: Sequence[SlotRef], hold_until: float = 0.0) -> list[bool]:
        """Makes written slots READY; False for a slot reclaimed meanwhile (its write lease ran out). With
        `hold_until` (a time.monotonic() value) the slots stay leased until then, or until released with
        SlotRef(slot, gen, hold_until): how a page not yet written through to disk stays in DRAM."""
        with self._locked():
            ok = []
            for r in refs:
                live = bool(int(self.gen[r.slot]) == r.gen and self.state[r.slot] == WRITING)
                if live:
                    self.state[r.slot], self.lease[r.slot] = READY, hold_until
                ok.append(live)
            return ok

    def abort(self, refs: Sequence[SlotRef]) -> None:
        with self._locked():
            for r in refs:
                if int(self.gen[r.slot]) == r.gen and self.state[r.slot] == WRITING:
                    self._free(r.slot)

    # accounting -----------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        states = np.bincount(self.state, minlength=3)
        return {"free": int(states[FREE]), "writing": int(states[WRITING]), "ready": int(states[READY])}

    def check_consistency(self) -> None:
        """Raises AssertionError unless the table and the slots agree (tests call it)."""
        with self._locked():
            held = np.flatnonzero(self.state != FREE).tolist()
            assert self.table.entries() == len(held), (self.table.entries(), len(held))
            for slot in held:
                assert self.table.find((int(self.keys[slot, 0]), int(self.keys[slot, 1]))) == slot, slot

    def close(self) -> None:
        """Unmaps; the last process to close removes the file (its DRAM goes back to the node)."""
        if self._mm is None:
            return
        for name in ("state", "gen", "keys", "parents", "tokens", "last_used", "lease", "allocated", "buckets"):
            setattr(self, name, None)
        self.table = None
        try:
            self._mm.close()
        except BufferError:  # a view of data() is still alive somewhere; the mapping goes with the process
            pass
        self._mm = None
        with self._file_lock():
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.path.exists(self.path) and os.path.samestat(os.fstat(self._fd), os.stat(self.path)):
                    os.unlink(self.path)
            except BlockingIOError:
                pass
            os.close(self._fd)
        os.close(self._lock_fd)
