"""Tile reorder, the window rule and the mask tables, entry by entry against brute force."""

import itertools
import math

import jax
import numpy as np
from fpsa_testlib import (
    brute_tile_mask,
    brute_token_mask,
    brute_window_start,
    grids,
    tiles,
    windows,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from fpsa_jax.attention import FPSAConfig, build_mask_info
from fpsa_jax.attention.tiling import from_tiles, slot_valid, tile_grid, to_tiles, token_mask


@settings(max_examples=30)
@given(grid=grids, tile=tiles)
def test_reorder_then_inverse_is_identity(grid, tile):
    x = np.random.default_rng(0).normal(size=(2, math.prod(grid), 1, 3)).astype(np.float32)
    roundtrip = jax.jit(lambda x: from_tiles(to_tiles(x, grid, tile), grid, tile))
    np.testing.assert_array_equal(roundtrip(x), x)


@settings(max_examples=30)
@given(grid=grids, tile=tiles)
def test_reorder_places_each_token_in_its_tile_slot(grid, tile):
    n = tile_grid(grid, tile)
    ids = np.arange(1, math.prod(grid) + 1, dtype=np.float32).reshape(1, -1, 1, 1)
    tiled = np.asarray(jax.jit(to_tiles, static_argnums=(1, 2))(ids, grid, tile))[
        0, :, :, 0, 0
    ]  # [n_tiles, P]
    want = np.zeros_like(tiled)  # 0 marks padding
    for t, h, w in itertools.product(*(range(g) for g in grid)):
        u = ((t // tile[0]) * n[1] + h // tile[1]) * n[2] + w // tile[2]
        r = ((t % tile[0]) * tile[1] + h % tile[1]) * tile[2] + w % tile[2]
        want[u, r] = (t * grid[1] + h) * grid[2] + w + 1
    np.testing.assert_array_equal(tiled, want)
    np.testing.assert_array_equal(slot_valid(grid, tile), want > 0)


@settings(max_examples=40)
@given(n=st.integers(1, 9), omega=st.integers(1, 12))
def test_window_is_shifted_never_cut(n, omega):
    for u in range(n):
        w, start = brute_window_start(u, n, omega)
        assert w == min(omega, n) and 0 <= start and start + w <= n
        if start not in (0, n - w):  # away from the borders the window is centred on u
            assert start == u - (w - 1) // 2


@settings(max_examples=40)
@given(grid=grids, tile=tiles, window=windows)
def test_mask_tables_match_brute_force(grid, tile, window):
    info = build_mask_info(grid, tile, window)
    dense = brute_tile_mask(grid, tile, window)
    n_tiles = dense.shape[0]
    assert info.tiles == tile_grid(grid, tile) and info.n_tiles == n_tiles
    for arr in (info.kv_tiles, info.tile_valid, info.q_tiles, info.q_count):
        assert arr.dtype == np.int32
    assert info.kv_tiles.shape == (n_tiles, info.kv_count)
    for u in range(n_tiles):
        np.testing.assert_array_equal(info.kv_tiles[u], np.nonzero(dense[u])[0])
    assert info.q_tiles.shape == (n_tiles, dense.sum(0).max())
    for v in range(n_tiles):
        qs = np.nonzero(dense[:, v])[0]
        assert info.q_count[v] == len(qs)
        np.testing.assert_array_equal(info.q_tiles[v, : len(qs)], qs)
        assert np.all(info.q_tiles[v, len(qs) :] == -1)
    np.testing.assert_array_equal(info.tile_valid, slot_valid(grid, tile).sum(1))
    cfg = FPSAConfig(tile=tile, window=window)
    assert math.isclose(cfg.density(grid), dense.mean()) and math.isclose(
        info.density, dense.mean()
    )


@settings(max_examples=30)
@given(grid=grids, tile=tiles, window=windows)
def test_token_mask_matches_brute_force(grid, tile, window):
    np.testing.assert_array_equal(
        token_mask(grid, tile, window), brute_token_mask(grid, tile, window)
    )


def test_mask_info_is_cached():
    assert build_mask_info((3, 4, 5), (1, 2, 2), (1, 1, 3)) is build_mask_info(
        [3, 4, 5], (1, 2, 2), [1, 1, 3]
    )


def test_grids_smaller_than_one_tile_are_one_padded_tile():
    info = build_mask_info((1, 2, 3), (4, 4, 4), (2, 2, 2))
    assert info.tiles == (1, 1, 1) and info.kv_count == 1
    np.testing.assert_array_equal(info.tile_valid, [6])
