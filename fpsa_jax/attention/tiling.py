"""Tile geometry: the tile grid, tile-major token reorder and its inverse, the window rule, and
the window of a given density.

Vocabulary: G = (T, H, W) token grid, tau = (tt, th, tw) tile, n = (nt, nh, nw) tile grid,
P = tt * th * tw tokens per tile, n_tiles = nt * nh * nw. Tiles are numbered row-major over n and
tokens row-major inside a tile; edge tiles are padded up to P slots.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax.attention.config import FPSAConfig, Int3, validate_grid


def tile_grid(grid: Int3, tile: Int3) -> Int3:
    """(nt, nh, nw) = ceil(grid / tile) per axis."""
    g = validate_grid(grid)
    return (-(-g[0] // tile[0]), -(-g[1] // tile[1]), -(-g[2] // tile[2]))


def to_tiles(x: jax.Array, grid: Int3, tile: Int3) -> jax.Array:
    """Reorders tokens tile-major, padding edge tiles with zeros.

    Args:
      x: [B, L, N, D] with L = T * H * W in row-major (t, h, w) order.
      grid: (T, H, W).
      tile: (tt, th, tw).

    Returns:
      [B, n_tiles, P, N, D]; padded slots are zero.
    """
    b, length, n_heads, d = x.shape
    t, h, w = grid
    if length != t * h * w:
        raise ValueError(f"to_tiles: L={length} != T*H*W={t * h * w} for grid {grid}")
    nt, nh, nw = tile_grid(grid, tile)
    tt, th, tw = tile
    x = x.reshape(b, t, h, w, n_heads, d)
    # Pad at the end of each axis: padded slots only ever sit at the far edge of a tile grid.
    pad = ((0, 0), (0, nt * tt - t), (0, nh * th - h), (0, nw * tw - w), (0, 0), (0, 0))
    x = jnp.pad(x, pad)
    x = x.reshape(b, nt, tt, nh, th, nw, tw, n_heads, d)
    x = jnp.einsum("bTtHhWwnd->bTHWthwnd", x)
    return x.reshape(b, nt * nh * nw, tt * th * tw, n_heads, d)


def from_tiles(x: jax.Array, grid: Int3, tile: Int3) -> jax.Array:
    """Inverse of `to_tiles`: [B, n_tiles, P, N, D] -> [B, L, N, D], padded slots dropped."""
    b, n_tiles, p, n_heads, d = x.shape
    t, h, w = grid
    nt, nh, nw = tile_grid(grid, tile)
    tt, th, tw = tile
    if n_tiles != nt * nh * nw or p != tt * th * tw:
        raise ValueError(
            f"from_tiles: expected [B, {nt * nh * nw}, {tt * th * tw}, N, D] for grid {grid} and "
            f"tile {tile}, got {x.shape}"
        )
    x = x.reshape(b, nt, nh, nw, tt, th, tw, n_heads, d)
    x = jnp.einsum("bTHWthwnd->bTtHhWwnd", x)
    x = x.reshape(b, nt * tt, nh * th, nw * tw, n_heads, d)[:, :t, :h, :w]
    return x.reshape(b, t * h * w, n_heads, d)


@functools.lru_cache(maxsize=256)
def tile_tokens(grid: Int3, tile: Int3) -> np.ndarray:
    """int32 [n_tiles, P]: the token (row-major (t, h, w) index) in each tile-major slot, -1 for
    padding. Slot (u, r) is `to_tiles`' slot r of tile u."""
    t, h, w = validate_grid(grid)
    n = tile_grid(grid, tile)
    # Coordinate of slot (tile u, offset r) along each axis is u * tile + r: [n_axis, tile_axis].
    ct, ch, cw = (
        np.arange(na)[:, None] * ta + np.arange(ta)[None, :] for na, ta in zip(n, tile, strict=True)
    )
    ct = ct[:, None, None, :, None, None]
    ch = ch[None, :, None, None, :, None]
    cw = cw[None, None, :, None, None, :]  # all three broadcast to [nt, nh, nw, tt, th, tw]
    token = np.where((ct < t) & (ch < h) & (cw < w), (ct * h + ch) * w + cw, -1)
    token = token.reshape(n[0] * n[1] * n[2], tile[0] * tile[1] * tile[2]).astype(np.int32)
    token.flags.writeable = False  # cached: callers must not mutate it
    return token


@functools.lru_cache(maxsize=256)
def slot_valid(grid: Int3, tile: Int3) -> np.ndarray:
    """bool [n_tiles, P]: whether each tile-major slot holds a real token (False = padding)."""
    valid = tile_tokens(grid, tile) >= 0
    valid.flags.writeable = False  # cached: callers must not mutate it
    return valid


def window_starts(n_axis: int, window_axis: int) -> tuple[int, np.ndarray]:
    """The window rule along one axis.

    Returns (w, start) with w = min(window_axis, n_axis) and start int32 [n_axis]:
    start[u] = clamp(u - (w - 1) // 2, 0, n_axis - w). Query tile u attends key tiles
    start[u] <= v < start[u] + w: the window is shifted, never cut, at the borders.
    """
    w = min(window_axis, n_axis)
    u = np.arange(n_axis)
    start = np.clip(u - (w - 1) // 2, 0, n_axis - w).astype(np.int32)
    return w, start


def axis_allowed(n_axis: int, window_axis: int | None) -> np.ndarray:
    """bool [n_axis, n_axis]: allowed[u, v] for query tile u and key tile v along one axis."""
    if window_axis is None:
        return np.ones((n_axis, n_axis), dtype=bool)
    w, start = window_starts(n_axis, window_axis)
    v = np.arange(n_axis)[None, :]
    return (v >= start[:, None]) & (v < start[:, None] + w)


def token_mask(grid: Int3, tile: Int3, window: Int3 | None) -> np.ndarray:
    """Dense bool [L, L] mask in token order (row = query, column = key), built from the rule.

    Materialises L^2 booleans: for the reference path and tests only.
    """
    t, h, w = validate_grid(grid)
    coords = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij"), -1)
    coords = coords.reshape(-1, 3)
    n = tile_grid(grid, tile)
    mask = np.ones((t * h * w, t * h * w), dtype=bool)
    for a in range(3):
        allowed = axis_allowed(n[a], None if window is None else window[a])
        tiles_a = coords[:, a] // tile[a]
        mask &= allowed[tiles_a[:, None], tiles_a[None, :]]
    return mask


def window_for_density(tile: Int3, grid: Sequence[int], density: float) -> Int3 | None:
    """The sliding-tile window whose density on `grid` is nearest `density`, None when that is
    the whole tile grid (dense).

    Rule: among all windows (w_t, w_h, w_w) with 1 <= w_a <= n_a (n = the tile grid), the one
    with |prod(w) / prod(n) - density| smallest; ties go to the window whose per-axis fractions
    w_a / n_a are most even (smallest max / min), then to the smallest tuple. Pure arithmetic: no
    weights are needed to know a window's density.
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    if not (math.isfinite(density) and 0.0 < density <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density}")
    n = tile_grid(validate_grid(grid), FPSAConfig(tile=tile).tile)
    total = math.prod(n)

    def key(w: Int3):
        fractions = [wa / na for wa, na in zip(w, n, strict=True)]
        return (abs(math.prod(w) / total - density), max(fractions) / min(fractions), w)

    best = min(itertools.product(*(range(1, na + 1) for na in n)), key=key)
    return None if best == n else best
