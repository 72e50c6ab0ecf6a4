"""The disk tier (no torch): round trips across restarts, damaged and foreign entries, capacity, a full disk,
and two processes sharing one node's DRAM pool and disk directory."""

import errno
import multiprocessing
import os

import pytest

from moe_pd.kvcache.tiers import disk_store as disk_store_module
from moe_pd.kvcache.tiers.disk_store import DiskStore
from moe_pd.kvcache.tiers.entry import header_size
from moe_pd.kvcache.tiers.host_pool import HostPool
from moe_pd.kvcache.tiers.identity import chain_keys

BS, PAGE = 4, 96
ROOT = b"m" * 16
ENTRY_BYTES = header_size(BS) + PAGE


def entries(tokens, root=ROOT):
    return list(chain_keys(root, tokens, BS))


def payload(entry) -> bytes:
    return (entry[0] * (PAGE // 16 + 1))[:PAGE]


def store(tmp_path, capacity_entries=100, digest=ROOT) -> DiskStore:
    return DiskStore(str(tmp_path / "disk"), digest, {"name": "test"}, capacity_entries * ENTRY_BYTES, PAGE, BS)


def write(s: DiskStore, ents) -> list[bool]:
    return s.write([(e, memoryview(payload(e))) for e in ents])


def read(s: DiskStore, entry) -> bytes | None:
    out = bytearray(PAGE)
    return bytes(out) if s.read(entry, memoryview(out)) else None


def test_round_trip_survives_a_restart_and_other_models_never_hit(tmp_path):
    ents = entries(list(range(40)))
    first = store(tmp_path)
    assert write(first, ents) == [True] * 10
    first.close()
    again = store(tmp_path)  # a new process on the same directory
    assert again.contains(ents) == 10 and [read(again, e) for e in ents] == [payload(e) for e in ents]
    other = store(tmp_path, digest=b"o" * 16)  # another checkpoint on the same directory
    assert other.contains(ents) == 0 and read(other, ents[0]) is None
    assert other.contains(entries(list(range(40)), root=b"o" * 16)) == 0
    assert (tmp_path / "disk" / ROOT.hex() / "identity.json").exists()


@pytest.mark.parametrize("damage", ["payload", "header", "truncate", "foreign"])
def test_a_damaged_or_foreign_entry_is_a_counted_miss_and_removed(tmp_path, damage):
    s = store(tmp_path)
    ents = entries(list(range(8)))
    write(s, ents)
    path = s.path(ents[1][0])
    blob = bytearray(open(path, "rb").read())
    if damage == "payload":
        blob[-1] ^= 0xFF
    elif damage == "header":
        blob[30] ^= 0x01
    elif damage == "truncate":
        blob = blob[:-10]
    else:  # another model's entry copied under this model's name
        other = store(tmp_path, digest=b"o" * 16)
        foreign = (ents[1][0], ents[1][1], ents[1][2])
        write(other, [foreign])
        blob = bytearray(open(other.path(foreign[0]), "rb").read())
    open(path, "wb").write(bytes(blob))
    assert read(s, ents[0]) == payload(ents[0])
    assert read(s, ents[1]) is None
    assert s.counters.corrupt == 1 and not os.path.exists(path)
    used, count = s.usage()  # the directory's: the other model's entry counts too
    left = 2 if damage == "foreign" else 1
    assert count == left and left * ENTRY_BYTES <= used < (left + 1) * ENTRY_BYTES  # never below the files


def test_a_hit_checks_tokens_and_parent(tmp_path):
    s = store(tmp_path)
    key, parent, tokens = entries(list(range(4)))[0]
    write(s, [(key, parent, tokens)])
    assert read(s, (key, parent, (7, 7, 7, 7))) is None
    assert s.counters.corrupt == 1  # a key that names other tokens is never served


def test_capacity_holds_and_recently_read_entries_survive(tmp_path):
    s = store(tmp_path, capacity_entries=10)
    hot = entries(list(range(400, 404)))
    write(s, hot)
    for i in range(8):
        write(s, entries(list(range(i * 100, i * 100 + 16))))
        assert read(s, hot[0]) == payload(hot[0])  # keeps the hot page the most recently used
        used, count = s.usage()
        assert used <= 10 * ENTRY_BYTES and count <= 10
    assert s.counters.evicted > 0 and s.contains(hot) == 1


def test_a_write_never_leaves_a_partial_entry_and_stale_temporary_files_go(tmp_path, monkeypatch):
    s = store(tmp_path)
    ents = entries(list(range(8)))
    real = disk_store_module.write_all

    def half_then_full(fd, buffers):
        os.write(fd, bytes(buffers[0])[:10])  # part of the entry is on disk when the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_store_module, "write_all", half_then_full)
    assert write(s, ents) == [False, False]
    assert s.counters.write_errors == 2 and s.contains(ents) == 0 and s.usage() == (0, 0)
    leftovers = [n for _, _, names in os.walk(tmp_path / "disk") for n in names if n.endswith(".tmp")]
    assert leftovers == []
    monkeypatch.setattr(disk_store_module, "write_all", real)
    assert write(s, ents) == [True, True] and read(s, ents[1]) == payload(ents[1])  # the tier goes on
    crashed = s.path(ents[0][0]) + ".123.456.tmp"  # a writer that died mid-entry
    open(crashed, "wb").write(b"partial")
    os.utime(crashed, (1, 1))
    assert s.contains(entries(list(range(8)))) == 2
    s._scan_and_evict(0)
    assert not os.path.exists(crashed) and s.usage() == (2 * ENTRY_BYTES, 2)


def _share(pool_path: str, disk_dir: str, worker: int, rounds: int, queue) -> None:
    """One process of a node: writes its own sessions' pages and pages every process shares, reads back
    whatever it finds, and reports any page that read back wrong."""
    pool = HostPool(pool_path, 24, PAGE, BS, ROOT)
    disk = DiskStore(disk_dir, ROOT, {"name": "test"}, 40 * ENTRY_BYTES, PAGE, BS)
    wrong = 0
    for r in range(rounds):
        ents = entries(list(range(1000 * worker + 8 * r, 1000 * worker + 8 * r + 8)))
        shared = entries(list(range(9000 + 4 * (r % 5), 9000 + 4 * (r % 5) + 4)))
        for group in (ents, shared):
            refs = pool.reserve(group)
            data = pool.data()
            for e, ref in zip(group, refs):
                if ref is not None:
                    data[ref.slot * pool.slot_stride : ref.slot * pool.slot_stride + PAGE] = payload(e)
            pool.commit([ref for ref in refs if ref is not None])
            disk.write([(e, memoryview(payload(e))) for e in group])
        for ref, e in zip(pool.lookup(shared, lease_s=5), shared):
            start = ref.slot * pool.slot_stride
            got = bytes(pool.data()[start : start + PAGE])
            wrong += got != payload(e) and pool.validate([ref]) == [True]
        out = bytearray(PAGE)
        wrong += disk.read(shared[0], memoryview(out)) and bytes(out) != payload(shared[0])
    pool.check_consistency()
    queue.put((worker, wrong, disk.usage()))
    pool.close()


def test_two_processes_share_a_node_pool_and_directory_within_capacity(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    args = (str(tmp_path / "pool"), str(tmp_path / "disk"))
    procs = [ctx.Process(target=_share, args=(*args, w, 30, queue)) for w in (1, 2)]
    keeper = HostPool(args[0], 24, PAGE, BS, ROOT)  # the test's own handle: sees what both wrote
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert [wrong for _, wrong, _ in results] == [0, 0]
    keeper.check_consistency()
    assert keeper.counts()["writing"] == 0 and keeper.counts()["ready"] == 24
    disk = DiskStore(args[1], ROOT, {"name": "test"}, 40 * ENTRY_BYTES, PAGE, BS)
    on_disk = [n for _, _, names in os.walk(args[1]) for n in names if n.endswith(".kv")]
    assert len(on_disk) <= 40 and disk._scan_and_evict(0)[0] <= 40 * ENTRY_BYTES
    keeper.close()
    assert not os.path.exists(args[0])  # the last process out gave the memory back
