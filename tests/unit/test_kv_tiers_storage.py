"""KV tiers as storage, no torch: the shared DRAM pool's index, the disk directory, model identities."""

import random
import time
from dataclasses import replace

import numpy as np
import pytest

from moe_pd.config.model import ModelConfig
from moe_pd.kvcache.tiers import host_pool as host_pool_module
from moe_pd.kvcache.tiers.host_pool import HostPool
from moe_pd.kvcache.tiers.identity import ModelIdentity, chain_keys, page_key, weights_fingerprint
from moe_pd.kvcache.tiers.slot_table import EMPTY, SlotTable

BS, PAGE = 4, 96
ROOT = b"m" * 16


def entries(tokens, root=ROOT):
    return list(chain_keys(root, tokens, BS))


def payload(entry) -> bytes:
    """The bytes a page 'holds' in these tests: a function of its key, so any mix-up shows."""
    return (entry[0] * (PAGE // 16 + 1))[:PAGE]


def pool(tmp_path, slots=8, name="pool", identity=ROOT):
    return HostPool(str(tmp_path / name), slots, PAGE, BS, identity)


def put(p: HostPool, ents) -> list:
    refs = p.reserve(ents)
    data = p.data()
    for e, r in zip(ents, refs):
        if r is not None:
            data[r.slot * p.slot_stride : r.slot * p.slot_stride + PAGE] = payload(e)
    p.commit([r for r in refs if r is not None])
    return refs


def read(p: HostPool, ref) -> bytes:
    return bytes(p.data()[ref.slot * p.slot_stride : ref.slot * p.slot_stride + PAGE])


# keys and identity -----------------------------------------------------------------------------------------
def test_keys_chain_over_the_model_digest_and_every_earlier_page():
    a = entries(list(range(12)))
    assert [e[1] for e in a] == [ROOT, a[0][0], a[1][0]]  # each page's parent is the page before it
    assert entries(list(range(12)), root=b"n" * 16)[0][0] != a[0][0]  # another model: other keys
    changed = entries([99] + list(range(1, 12)))
    assert all(x[0] != y[0] for x, y in zip(a, changed))  # a change in page 0 changes every later key
    assert page_key(ROOT, (0, 1, 2, 3)) == a[0][0] and len(a[0][0]) == 16


def test_identity_differs_by_config_weights_dtype_layout_and_block_size(tmp_path):
    cfg = ModelConfig(num_hidden_layers=4, hidden_size=64)
    base = ModelIdentity.of(cfg, "torch.float32", 16)
    assert ModelIdentity.of(cfg, "float32", 16).digest == base.digest == ModelIdentity.of(cfg, "float32", 16, 4).digest
    others = [ModelIdentity.of(replace(cfg, init_seed=1), "float32", 16),
              ModelIdentity.of(replace(cfg, hidden_size=128), "float32", 16),
              ModelIdentity.of(cfg, "bfloat16", 16), ModelIdentity.of(cfg, "float32", 32),
              replace(base, kv_layout="mla:L=2:row=512+64:SLW"),
              ModelIdentity.of(cfg, "float32", 16, num_layers=5)]  # a cache with the MTP layer's rows too
    assert len({o.digest for o in others} | {base.digest}) == len(others) + 1


def test_weights_fingerprint_reads_the_checkpoint_not_its_path(tmp_path):
    def checkpoint(folder, fill):
        folder.mkdir()
        header = b'{"w":{"dtype":"F32","shape":[4096],"data_offsets":[0,16384]}}'
        (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes([fill]) * 16384)
        return folder

    a, a_copy, b = (checkpoint(tmp_path / n, f) for n, f in (("a", 1), ("a2", 1), ("b", 2)))
    assert weights_fingerprint(a) == weights_fingerprint(a_copy) != weights_fingerprint(b)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        weights_fingerprint(tmp_path)


# the slot table ---------------------------------------------------------------------------------------------
def test_slot_table_agrees_with_a_dict_under_random_inserts_and_deletes():
    rng = random.Random(0)
    num_slots = 64
    keys = np.zeros((num_slots, 2), dtype=np.uint64)
    table = SlotTable(np.full(128, EMPTY, dtype=np.int32), keys)
    ref: dict[tuple[int, int], int] = {}
    free = list(range(num_slots))
    for _ in range(5000):
        if free and (not ref or rng.random() < 0.55):
            words = (rng.randrange(8) * 128 + rng.randrange(4), rng.getrandbits(64))  # many share a home
            if words in ref:
                continue
            slot = free.pop()
            keys[slot] = words
            table.insert(words, slot)
            ref[words] = slot
        else:
            words = rng.choice(list(ref))
            assert table.delete(words)
            free.append(ref.pop(words))
        assert table.entries() == len(ref)
    for words, slot in ref.items():
        assert table.find(words) == slot
    assert table.find((12345, 678)) == EMPTY and not table.delete((12345, 678))


# the DRAM pool ----------------------------------------------------------------------------------------------
def test_pool_round_trip_is_byte_exact_and_writing_slots_are_invisible(tmp_path):
    p = pool(tmp_path)
    ents = entries(list(range(20)))
    refs = p.reserve(ents[:3])
    assert p.lookup(ents) == []  # reserved, not committed: nobody may read a half-written page
    assert p.reserve(ents[:3]) == [None] * 3  # nor write it a second time
    p.abort(refs)
    put(p, ents)
    found = p.lookup(ents)
    assert len(found) == 5 and [read(p, r) for r in found] == [payload(e) for e in ents]
    assert p.validate(found) == [True] * 5
    missing = entries(list(range(50, 54)))[0]
    assert p.lookup([missing, ents[1]]) == [] and p.find([missing, ents[1]]) == [None, found[1]]
    p.check_consistency()


def test_pool_hit_is_token_and_parent_checked(tmp_path):
    p = pool(tmp_path)
    key, parent, tokens = entries(list(range(4)))[0]
    put(p, [(key, parent, tokens)])
    assert p.lookup([(key, parent, (9, 9, 9, 9))]) == []  # same key, other tokens: a miss
    assert p.lookup([(key, b"x" * 16, tokens)]) == []  # same key, other parent: a miss
    assert len(p.lookup([(key, parent, tokens)])) == 1


def test_pool_evicts_least_recently_used_and_a_chain_loses_its_tail_first(tmp_path):
    p = pool(tmp_path, slots=6)
    a, b = entries(list(range(12))), entries(list(range(100, 112)))
    put(p, a)
    put(p, b)
    p.lookup(a)  # a is now the most recent chain
    put(p, entries(list(range(200, 208))))  # needs two slots: b's tail, then b's middle go
    assert len(p.lookup(a)) == 3 and len(p.lookup(b)) == 1
    assert p.num_slots == 6 and p.counts()["ready"] == 6
    p.check_consistency()


def test_a_leased_slot_is_not_evicted_and_a_reclaimed_one_fails_validation(tmp_path, monkeypatch):
    p = pool(tmp_path, slots=3)
    a = entries(list(range(12)))
    put(p, a)
    leased = p.lookup(a, lease_s=60)
    assert all(r is None for r in p.reserve(entries(list(range(50, 62)))))  # no slot may be taken
    assert p.validate(leased) == [True] * 3
    p.release(leased[2:])  # the reader is done with the last page: it may go again
    refs = p.reserve(entries(list(range(70, 78))))
    assert [r is None for r in refs] == [False, True]
    p.commit(refs[:1])
    p2 = pool(tmp_path, slots=3)  # another handle on the same pool (as another process would have)
    now = time.monotonic()
    monkeypatch.setattr(host_pool_module.time, "monotonic", lambda: now + 120)  # the lease ran out
    put(p2, entries(list(range(50, 54))))
    assert p.validate(leased[:2]).count(False) == 1  # the reclaimed page is detected, the other still holds


def test_pool_format_mismatch_in_use_is_refused_and_the_last_close_removes_the_file(tmp_path):
    a = pool(tmp_path)
    with pytest.raises(ValueError, match="another model or page format"):
        HostPool(str(tmp_path / "pool"), 8, PAGE * 2, BS, ROOT)
    with pytest.raises(ValueError, match="another model or page format"):
        HostPool(str(tmp_path / "pool"), 8, PAGE, BS, b"o" * 16)
    b = HostPool(str(tmp_path / "pool"), 16, PAGE, BS, ROOT)  # another size: joins the pool as it is
    assert b.num_slots == 8
    put(a, entries(list(range(4))))
    assert len(b.lookup(entries(list(range(4))))) == 1  # one pool, seen through both handles
    a.close()
    assert (tmp_path / "pool").exists()
    b.close()
    assert not (tmp_path / "pool").exists()
    c = HostPool(str(tmp_path / "pool"), 16, PAGE, BS, ROOT)  # nobody uses it now: any shape may be made
    assert c.num_slots == 16
    c.close()


def test_a_reader_releases_only_the_lease_it_set(tmp_path):
    p = pool(tmp_path, slots=2)
    ents = entries(list(range(8)))
    refs = p.reserve(ents)
    hold = time.monotonic() + 60  # held until written through to disk
    p.commit(refs, hold_until=hold)
    reader = p.lookup(ents, lease_s=5)  # a shorter lease: the hold stays the one in force
    assert [r.lease for r in reader] == [0.0, 0.0]
    p.release(reader)
    assert p.reserve(entries(list(range(50, 54)))) == [None]  # still held
    p.release([host_pool_module.SlotRef(r.slot, r.gen, hold) for r in refs])  # the disk write is done
    assert p.reserve(entries(list(range(50, 54)))) != [None]
