"""Page mapping between pools of different page sizes: the descriptors move exactly the request's rows."""

import ctypes

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_pd.kvcache.transfer.page_map import PoolLayout, descriptors, row_runs

LAYERS, WIDTH = 3, 5


def token_copy(src, src_pages, dst, dst_pages, num_tokens):
    """The reference: token by token, every layer."""
    s_block, d_block = src.shape[2], dst.shape[2]
    for i in range(num_tokens):
        dst[:, dst_pages[i // d_block], i % d_block] = src[:, src_pages[i // s_block], i % s_block]


def memmove_copy(src, src_pages, dst, dst_pages, num_tokens):
    """What NIXL does with our descriptors: copies bytes from each source address to its destination."""
    src_layout, dst_layout = PoolLayout.of(src), PoolLayout.of(dst)
    runs = row_runs(src_pages, src_layout.block_size, dst_pages, dst_layout.block_size, num_tokens,
                    src_layout.num_pages, dst_layout.num_pages)
    src_d = descriptors(src_layout, runs[:, 0], runs[:, 2])
    dst_d = descriptors(dst_layout, runs[:, 1], runs[:, 2])
    assert (src_d[:, 1] == dst_d[:, 1]).all()
    for (s_addr, size, _), (d_addr, _, _) in zip(src_d.tolist(), dst_d.tolist()):
        ctypes.memmove(d_addr, s_addr, size)
    return runs, src_d


def pools(src_block, dst_block, src_num=12, dst_num=12, dtype=torch.float32):
    src = torch.randn(LAYERS, src_num, src_block, WIDTH).to(dtype)
    return src, torch.zeros(LAYERS, dst_num, dst_block, WIDTH, dtype=dtype)


@pytest.mark.parametrize("src_block,dst_block,num_tokens", [(4, 4, 11), (4, 16, 37), (16, 4, 37), (6, 4, 23),
                                                            (8, 8, 16)])
def test_rows_land_where_the_reference_puts_them(src_block, dst_block, num_tokens):
    src, dst = pools(src_block, dst_block)
    rng = np.random.default_rng(0)
    src_pages = rng.permutation(12)[:-(-num_tokens // src_block)].tolist()
    dst_pages = rng.permutation(12)[:-(-num_tokens // dst_block)].tolist()
    expected = dst.clone()
    token_copy(src, src_pages, expected, dst_pages, num_tokens)
    runs, src_d = memmove_copy(src, src_pages, dst, dst_pages, num_tokens)
    assert torch.equal(dst, expected)
    assert runs[:, 2].sum() == num_tokens
    assert int(src_d[:, 1].sum()) == num_tokens * LAYERS * WIDTH * 4


def test_adjacent_pages_merge_into_one_descriptor_per_layer():
    runs = row_runs([2, 3, 4], 4, [7, 8, 9], 4, 12)
    assert runs.tolist() == [[8, 28, 12]]
    # a larger destination page: the source's boundaries cut, the destination's contiguity keeps merging
    assert row_runs([0, 5], 4, [1], 8, 8).tolist() == [[0, 8, 4], [20, 12, 4]]


def test_bf16_pool_and_a_partial_last_page():
    src, dst = pools(4, 8, dtype=torch.bfloat16)
    memmove_copy(src, [3, 1, 0], dst, [2, 5], 9)
    assert torch.equal(dst[:, 2], torch.cat((src[:, 3], src[:, 1]), dim=1))
    assert torch.equal(dst[:, 5, :1], src[:, 0, :1]) and dst[:, 5, 1:].abs().sum() == 0


@pytest.mark.parametrize("src,dst,num_tokens,message", [
    ([0], [0, 1], 8, "source pages hold 4 tokens, 8 needed"),
    ([0, 1], [3, 3], 8, "destination pages repeat"),
    ([0, 12], [0, 1], 8, r"source page ids must lie in \[0, 12\)"),
    ([0, 1], [-1, 1], 8, "destination page ids"),
])
def test_bad_pages_are_refused(src, dst, num_tokens, message):
    with pytest.raises(ValueError, match=message):
        row_runs(src, 4, dst, 4, num_tokens, 12, 12)


def test_layouts_must_agree_on_layers_width_and_dtype():
    a = PoolLayout.of(torch.zeros(3, 4, 4, 5))
    assert a.mismatch(PoolLayout.of(torch.zeros(3, 9, 16, 5))) == ""
    assert "num_layers" in a.mismatch(PoolLayout.of(torch.zeros(2, 4, 4, 5)))
    assert "row_bytes" in a.mismatch(PoolLayout.of(torch.zeros(3, 4, 4, 6)))
    assert "dtype" in a.mismatch(PoolLayout.of(torch.zeros(3, 4, 4, 10, dtype=torch.float16)))
    with pytest.raises(ValueError, match="contiguous"):
        PoolLayout.of(torch.zeros(3, 4, 4, 10)[..., ::2])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 60), st.randoms(use_true_random=False))
def test_any_page_sizes_and_orders_match_the_reference(src_block, dst_block, num_tokens, rnd):
    src_num, dst_num = -(-num_tokens // src_block) + 2, -(-num_tokens // dst_block) + 2
    src, dst = pools(src_block, dst_block, src_num, dst_num)
    src_pages, dst_pages = rnd.sample(range(src_num), src_num), rnd.sample(range(dst_num), dst_num)
    expected = dst.clone()
    token_copy(src, src_pages, expected, dst_pages, num_tokens)
    memmove_copy(src, src_pages, dst, dst_pages, num_tokens)
    assert torch.equal(dst, expected)
