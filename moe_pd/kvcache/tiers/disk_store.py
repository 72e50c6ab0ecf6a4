"""The disk tier: one checksummed file per page under a directory that outlives the process (no torch).

Layout: `<dir>/<model digest>/<first key byte>/<key>.kv` (entry.py's format) beside an `identity.json` that
says which model the digest names, so a different checkpoint reads nothing of another's (its pages sit
under another digest, and every header names the digest too). The directory-wide files `.lock` and
`usage` let every process that names the directory share it:

- writes are atomic: each entry is written to a temporary file and renamed into place, so a reader sees
  a whole entry or none. A crash leaves only a temporary file, which the next scan removes.
- capacity holds under concurrent writers: a writer reserves its bytes in `usage` under the directory
  lock before writing, and when the reservation would pass the capacity it first removes the least
  recently used entries (file mtime, touched on every hit) down to the low watermark. The scan that finds
  them also recounts `usage` from the files, so any drift (a crashed writer's reservation, two processes
  writing one page) is corrected there, always in the safe direction in between (over-counted).
- a truncated, corrupted or foreign entry is a miss: it is removed and counted, never served.
- an OS error while writing (a full disk) drops that entry, releases its reservation and is counted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from moe_pd.kvcache.tiers.entry import check_header, header_size, pack_header

Entry = tuple[bytes, bytes, Sequence[int]]
_USAGE = struct.Struct("<qq")  # bytes used, entries
LOW_WATERMARK = 0.9
STALE_TMP_S = 600.0


@dataclass
class DiskCounters:
    written: int = 0
    write_errors: int = 0
    corrupt: int = 0
    evicted: int = 0
    read_hits: int = 0
    scans: int = 0


class DiskStore:
    def __init__(self, root: str, digest: bytes, describe: dict, capacity_bytes: int, page_bytes: int,
                 block_size: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"disk tier {root}: capacity {capacity_bytes} bytes must be > 0")
        self.root, self.digest, self.capacity = root, digest, capacity_bytes
        self.page_bytes, self.block_size = page_bytes, block_size
        self.entry_bytes = header_size(block_size) + page_bytes
        self.dir = os.path.join(root, digest.hex())
        os.makedirs(self.dir, exist_ok=True)
        self.counters = DiskCounters()
        self.removed_keys: deque[bytes] = deque()
        """Keys of this model's entries this process removed (evicted, damaged), until the owner takes them."""
        self._tlock = threading.Lock()
        self._lock_fd = os.open(os.path.join(root, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        self._usage_fd = os.open(os.path.join(root, "usage"), os.O_RDWR | os.O_CREAT, 0o644)
        with self._locked():
            if len(os.pread(self._usage_fd, _USAGE.size, 0)) < _USAGE.size:
                self._scan_and_evict(0)  # a new directory, or one whose usage file was lost: count the files
        self._write_identity(describe)

    def _write_identity(self, describe: dict) -> None:
        path = os.path.join(self.dir, "identity.json")
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "w") as f:
                json.dump(describe, f, indent=1, sort_keys=True)
            os.rename(tmp, path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._tlock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _usage(self) -> tuple[int, int]:
        raw = os.pread(self._usage_fd, _USAGE.size, 0)
        return _USAGE.unpack(raw) if len(raw) == _USAGE.size else (0, 0)

    def _set_usage(self, used: int, entries: int) -> None:
        os.pwrite(self._usage_fd, _USAGE.pack(max(used, 0), max(entries, 0)), 0)

    def usage(self) -> tuple[int, int]:
        """(bytes, entries) in the whole directory, as accounted (an upper bound between scans)."""
        with self._locked():
            return self._usage()

    def path(self, key: bytes) -> str:
        return os.path.join(self.dir, f"{key[0]:02x}", key.hex() + ".kv")

    # reading --------------------------------------------------------------------------------------------
    def contains(self, entries: Iterable[Entry]) -> int:
        """How many leading entries have a file (their content is checked when read)."""
        n = 0
        for key, _, _ in entries:
            if not os.path.exists(self.path(key)):
                break
            n += 1
        return n

    def read(self, entry: Entry, out: memoryview) -> bool:
        """Reads the page into `out` (page_bytes); False on a miss. A damaged entry is removed and counted."""
        key, parent, tokens = entry
        path = self.path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            size = os.fstat(fd).st_size
            header = os.pread(fd, header_size(len(tokens)), 0)
            crc, why = check_header(header, self.digest, key, parent, tokens, self.page_bytes)
            if why is None and size != len(header) + self.page_bytes:
                why = "file size"
            if why is None:
                n = os.preadv(fd, [out[: self.page_bytes]], len(header))
                if n != self.page_bytes or zlib.crc32(out[: self.page_bytes]) != crc:
                    why = "payload checksum"
        finally:
            os.close(fd)
        if why is not None:
            self._drop_corrupt(path, size)
            return False
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)  # LRU: a hit makes the entry the most recent
        self.counters.read_hits += 1
        return True

    def _drop_corrupt(self, path: str, size: int) -> None:
        self.counters.corrupt += 1
        self.removed_keys.append(_key_of(path))
        with self._locked():
            try:
                os.unlink(path)
            except FileNotFoundError:
                return  # another process removed it (and accounted for it)
            used, entries = self._usage()
            self._set_usage(used - size, entries - 1)

    # writing --------------------------------------------------------------------------------------------
    def write(self, items: Sequence[tuple[Entry, memoryview]]) -> list[bool]:
        """Writes the pages not on disk yet; True for each page on disk afterwards."""
        done = [os.path.exists(self.path(key)) for (key, _, _), _ in items]
        first = {key: i for i, ((key, _, _), _) in reversed(list(enumerate(items)))}
        todo = [i for i, there in enumerate(done) if not there and first[items[i][0][0]] == i]
        if not todo:
            return done
        with self._locked():
            used, entries = self._usage()
            fits = (self.capacity - used) // self.entry_bytes
            if fits < len(todo):
                used, entries = self._scan_and_evict(len(todo) * self.entry_bytes)
                fits = (self.capacity - used) // self.entry_bytes
            todo = todo[: max(fits, 0)]
            self._set_usage(used + len(todo) * self.entry_bytes, entries + len(todo))
        failed = 0
        for i in todo:
            (key, parent, tokens), payload = items[i]
            if self._write_one(key, parent, tokens, payload):
                done[i] = True
            else:
                failed += 1
        if failed:
            with self._locked():
                used, entries = self._usage()
                self._set_usage(used - failed * self.entry_bytes, entries - failed)
        return done

    def _write_one(self, key: bytes, parent: bytes, tokens: Sequence[int], payload: memoryview) -> bool:
        path = self.path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        payload = payload[: self.page_bytes]
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                write_all(fd, [pack_header(self.digest, key, parent, tokens, payload), payload])
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except OSError:
            self.counters.write_errors += 1
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return False
        self.counters.written += 1
        return True

    def keys(self, limit: int = 1_000_000) -> list[bytes]:
        """Keys of this model's entries on disk (at most `limit`), e.g. what a restarted process reports to
        the routers before it wrote anything."""
        out: list[bytes] = []
        for sub in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, sub)
            if not os.path.isdir(path):
                continue
            out += [_key_of(name) for name in os.listdir(path) if name.endswith(".kv")][: limit - len(out)]
            if len(out) >= limit:
                break
        return out

    # capacity -------------------------------------------------------------------------------------------
    def _scan_and_evict(self, need: int) -> tuple[int, int]:
        """Under the lock: counts every entry of the directory (all models), removes stale temporary files,
        and removes the least recently used entries until `need` more bytes fit under the low watermark.
        Writes and returns the corrected (bytes, entries)."""
        self.counters.scans += 1
        files = []
        now = time.time()  # the clock of file mtimes
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                full = os.path.join(dirpath, name)
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue
                if name.endswith(".tmp"):
                    if now - st.st_mtime > STALE_TMP_S:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(full)
                elif name.endswith(".kv"):
                    files.append((st.st_mtime_ns, st.st_size, full))
        used = sum(size for _, size, _ in files)
        target = LOW_WATERMARK * self.capacity - need if need else self.capacity
        files.sort()
        removed = 0
        while files and used > target:
            _, size, full = files.pop(0)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(full)
                removed += 1
                if os.path.dirname(os.path.dirname(full)) == self.dir:  # this model's entry
                    self.removed_keys.append(_key_of(full))
            used -= size
        self.counters.evicted += removed
        self._set_usage(used, len(files))
        return used, len(files)

    def close(self) -> None:
        for fd in (self._lock_fd, self._usage_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def _key_of(path: str) -> bytes:
    return bytes.fromhex(os.path.basename(path).removesuffix(".kv"))


def write_all(fd: int, buffers: list) -> None:
    """os.writev until every byte is written (a short write is legal, e.g. near a full disk)."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        n = os.writev(fd, views)
        if n == 0:
            raise OSError("no progress writing a tier entry")
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
