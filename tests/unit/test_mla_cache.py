"""MLA over the paged latent cache: absorbed == expanded, paging and chunking do not change results."""

import pytest
import torch

from helpers.runner import forward_logits, fresh_cache
from helpers.tiny import TINY
from moe_pd.kvcache.paged import AttentionBatch
from moe_pd.model.loader import build_model


@pytest.fixture(scope="module")
def model():
    return build_model(TINY)


def run(model, cache, tables, ctx, new, mode):
    batch = AttentionBatch.build(tables, ctx, [len(n) for n in new], cache.block_size)
    with torch.inference_mode():
        return model.logits(model(torch.tensor([t for n in new for t in n]), batch, cache, mode))


def test_cache_row_is_latent_plus_rope_key(model):
    cache = fresh_cache(model)
    assert cache.kv_LPSW.shape[-1] == TINY.kv_lora_rank + TINY.qk_rope_head_dim
    assert cache.bytes_per_token() == TINY.num_hidden_layers * (TINY.kv_lora_rank + TINY.qk_rope_head_dim) * 4


@pytest.mark.parametrize("query_lens", [[1, 1, 1], [3, 1, 5]])
def test_absorbed_equals_expanded(model, query_lens):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (6, 9, 3)]
    tables = [[0, 1, 2], [3, 4, 5], [6, 7]]
    outs = {}
    for mode in ("expanded", "absorbed"):
        cache = fresh_cache(model, num_blocks=8, block_size=4)
        run(model, cache, tables, [0, 0, 0], prompts, "expanded")
        new = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in query_lens]
        outs[mode] = run(model, cache, tables, [len(p) for p in prompts], new, mode)
    torch.testing.assert_close(outs["absorbed"], outs["expanded"], rtol=1e-5, atol=1e-5)


def test_paging_and_chunking_do_not_change_logits(model):
    prompt = list(range(40, 63))
    whole = forward_logits(model, [prompt], block_size=64)[0]  # one page, contiguous
    paged = forward_logits(model, [prompt], block_size=4)[0]  # 6 pages, handed out in reverse
    torch.testing.assert_close(paged, whole, rtol=1e-5, atol=1e-5)
    cache = fresh_cache(model, num_blocks=8, block_size=4)
    table = [5, 2, 7, 0, 1, 3]
    first = run(model, cache, [table], [0], [prompt[:10]], "auto")
    second = run(model, cache, [table], [10], [prompt[10:]], "auto")
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=1e-5, atol=1e-5)


def test_batch_neighbours_do_not_leak(model):
    a, b = list(range(1, 12)), list(range(100, 105))
    alone = forward_logits(model, [a])[0]
    together = forward_logits(model, [b, a])[1]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_empty_batch(model):
    cache = fresh_cache(model)
    batch = AttentionBatch.build([], [], [], cache.block_size)
    with torch.inference_mode():
        out = model(torch.zeros(0, dtype=torch.int64), batch, cache)
    assert out.shape == (0, TINY.hidden_size)


def test_block_table_too_short_is_an_error():
    with pytest.raises(ValueError, match="block table holds 1 pages"):
        AttentionBatch.build([[0]], [0], [5], 4)
