"""The kernel layout's tables against brute force: valid-first slots, their inverse, the
table-driven reorder, and the key-block list the Triton forward and the Pallas twin walk."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from fpsa_jax.attention.kernel_layout import (
    from_kernel_layout,
    key_bias,
    key_block_list,
    live_query_blocks,
    padded_tile_length,
    slot_tokens,
    to_kernel_layout,
    token_slots,
)
from fpsa_jax.attention.mask import build_mask_info
from pallas_kernels import pallas_fpsa

# (grid, tile, window): tiles that do not divide the grid, one that is larger than it, and the
# 480p Wan grid with the presets' tile.
LAYOUTS = [
    ((3, 5, 6), (2, 8, 8), None),
    ((4, 9, 10), (3, 8, 8), (1, 1, 2)),
    ((5, 7, 9), (3, 5, 6), (2, 1, 2)),
    ((2, 3, 7), (2, 2, 3), (4, 4, 4)),
    ((1, 3, 2), (2, 4, 4), None),
    ((21, 30, 52), (3, 8, 8), (3, 2, 3)),
]


def brute_force_slots(grid, tile, pp):
    """Per tile, its tokens in row-major (t, h, w) order (= increasing token index), then -1."""
    t, h, w = grid
    n = [-(-g // a) for g, a in zip(grid, tile, strict=True)]
    per_tile = [[] for _ in range(math.prod(n))]
    for token in range(t * h * w):
        c = (token // (h * w), token // w % h, token % w)
        u = ((c[0] // tile[0]) * n[1] + c[1] // tile[1]) * n[2] + c[2] // tile[2]
        per_tile[u].append(token)
    return np.array([row + [-1] * (pp - len(row)) for row in per_tile], np.int32).reshape(-1)


@pytest.mark.parametrize("grid, tile, window", LAYOUTS)
def test_slots_are_valid_first_in_row_major_order(grid, tile, window):
    pp = padded_tile_length(math.prod(tile), 64)
    table = slot_tokens(grid, tile, pp)
    assert table.dtype == np.int32 and not table.flags.writeable
    np.testing.assert_array_equal(table, brute_force_slots(grid, tile, pp))
    np.testing.assert_array_equal(key_bias(grid, tile, pp) == 0, table >= 0)
    slots = token_slots(grid, tile, pp)
    assert slots.dtype == np.int32 and slots.shape == (math.prod(grid),)
    np.testing.assert_array_equal(table[slots], np.arange(math.prod(grid)))


def test_reorder_follows_the_slot_table_and_inverts():
    grid, tile, pp = (3, 5, 6), (2, 8, 8), 128
    x = jnp.arange(2 * 90 * 3 * 4, dtype=jnp.float32).reshape(2, 90, 3, 4) + 1
    xk = np.asarray(to_kernel_layout(x, grid, tile, pp))  # [B, N, Lp, D]
    table = slot_tokens(grid, tile, pp)
    want = np.where((table >= 0)[None, :, None, None], np.asarray(x)[:, table], 0)
    np.testing.assert_array_equal(xk, np.einsum("blnd->bnld", want))
    np.testing.assert_array_equal(np.asarray(from_kernel_layout(xk, grid, tile, pp)), x)
    with pytest.raises(ValueError, match="L=89 != T\\*H\\*W=90"):
        to_kernel_layout(x[:, :89], grid, tile, pp)


def test_slot_table_rejects_a_padded_tile_shorter_than_the_tile():
    with pytest.raises(ValueError, match="padded tile length 64 < tile volume 128"):
        slot_tokens((3, 5, 6), (2, 8, 8), 64)


@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("grid, tile, window", LAYOUTS)
def test_key_block_list_skips_exactly_the_all_padding_blocks(grid, tile, window, block):
    pp = padded_tile_length(math.prod(tile), 64)
    kb = pp // block
    table = slot_tokens(grid, tile, pp)
    kv_tiles = build_mask_info(grid, tile, window).kv_tiles
    lists = key_block_list(grid, tile, window, pp, block)
    assert lists.blocks.dtype == lists.count.dtype == np.int32
    assert not lists.blocks.flags.writeable and not lists.count.flags.writeable
    assert lists.blocks.shape == (kv_tiles.shape[0], int(lists.count.max()))
    for u, tiles in enumerate(kv_tiles):
        every = [v * kb + j for v in tiles for j in range(kb)]
        want = [b for b in every if (table[b * block : (b + 1) * block] >= 0).any()]
        row = lists.blocks[u]
        assert lists.count[u] == len(want)
        assert row[: len(want)].tolist() == want and (row[len(want) :] == -1).all()
        for b in set(every) - set(want):  # what is left out is padding only
            assert (table[b * block : (b + 1) * block] < 0).all()


def test_key_block_list_leaves_out_blocks_where_padding_fills_them():
    """(2, 8, 8) tiles on (3, 5, 6): 60 and 30 real slots of 128, so one of each tile's two key
    blocks of 64 is all padding, and so is one of its two query blocks."""
    lists = key_block_list((3, 5, 6), (2, 8, 8), None, 128, 64)
    assert lists.count.tolist() == [2, 2] and lists.blocks.tolist() == [[0, 2], [0, 2]]
    live = live_query_blocks((3, 5, 6), (2, 8, 8), 128, 64)
    assert live.tolist() == [[True, False], [True, False]]
    first = key_bias((3, 5, 6), (2, 8, 8), 128).reshape(-1, 64)[:, 0] == 0
    np.testing.assert_array_equal(live.reshape(-1), first)  # what the kernels test
    with pytest.raises(ValueError, match="not a multiple of the key block 48"):
        key_block_list((3, 5, 6), (2, 8, 8), None, 128, 48)


def test_pallas_kernel_rejects_bad_key_block_tables():
    q, v_t = jnp.zeros((1, 1, 64, 16), jnp.bfloat16), jnp.zeros((1, 1, 16, 64), jnp.bfloat16)
    ones = jnp.ones((1, 1, 1)), jnp.ones((1, 1, 1)), jnp.ones((1, 1, 16))
    kw = dict(padded_tile=64, scale=0.1, p_scale=1.0, out_dtype=jnp.float32, block_q=64,
              block_k=64, interpret=True)  # fmt: skip
    bias = jnp.zeros(64)
    with pytest.raises(ValueError, match=r"key_blocks must be \[n_tiles=1, M\]"):
        pallas_fpsa.fpsa_forward(q, q, v_t, *ones, bias, np.zeros((2, 1)), np.ones(1), **kw)
    with pytest.raises(ValueError, match=r"block_count must be \[n_tiles=1\]"):
        pallas_fpsa.fpsa_forward(q, q, v_t, *ones, bias, np.zeros((1, 1)), np.ones(2), **kw)
