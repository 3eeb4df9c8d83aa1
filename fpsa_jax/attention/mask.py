"""The mask description: host int32 tables that say which key tiles each query tile reads.

Built once per (grid, tile, window) on the host with NumPy and cached; kernels only read the tables.
Sliding-tile windows make the forward list rectangular: every query tile attends exactly
prod(min(window, n)) key tiles. The transposed list (query tiles per key tile, for dK/dV) is ragged
and is padded.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from fpsa_jax.attention.config import Int3, validate_grid
from fpsa_jax.attention.tiling import axis_allowed, slot_valid, tile_grid


@dataclasses.dataclass(frozen=True, eq=False)
class MaskInfo:
    """Block-sparse mask of one (grid, tile, window). All tables are read-only host NumPy arrays.

    Tile indices are row-major over the tile grid (nt, nh, nw): index = (ut * nh + uh) * nw + uw.

    Attributes:
      grid: token grid (T, H, W).
      tile: tile (tt, th, tw).
      window: window in tiles, or None (dense).
      tiles: tile grid (nt, nh, nw); n_tiles = nt * nh * nw.
      kv_tiles: int32 [n_tiles, kv_count]; row u lists the key tiles of query tile u in increasing
        order.
      kv_count: int; key tiles per query tile, the same for every query tile.
      tile_valid: int32 [n_tiles]; real (unpadded) tokens per tile, between 1 and P.
      q_tiles: int32 [n_tiles, max_q_per_k]; row v lists, in increasing order, the query tiles that
        attend key tile v, padded at the end with -1.
      q_count: int32 [n_tiles]; number of real entries in each row of q_tiles.
    """

    grid: Int3
    tile: Int3
    window: Int3 | None
    tiles: Int3
    kv_tiles: np.ndarray
    kv_count: int
    tile_valid: np.ndarray
    q_tiles: np.ndarray
    q_count: np.ndarray

    @property
    def n_tiles(self) -> int:
        return math.prod(self.tiles)

    @property
    def tile_volume(self) -> int:
        """P = tt * th * tw slots per tile."""
        return math.prod(self.tile)

    @property
    def density(self) -> float:
        """Computed tile pairs over all tile pairs: kv_count / n_tiles."""
        return self.kv_count / self.n_tiles


@functools.lru_cache(maxsize=256)
def _build(grid: Int3, tile: Int3, window: Int3 | None) -> MaskInfo:
    n = tile_grid(grid, tile)
    # Tile-level allowed matrix as an outer product of the per-axis rule: [n_tiles, n_tiles].
    at, ah, aw = (axis_allowed(n[a], None if window is None else window[a]) for a in range(3))
    allowed = (
        at[:, None, None, :, None, None]
        & ah[None, :, None, None, :, None]
        & aw[None, None, :, None, None, :]
    ).reshape(math.prod(n), math.prod(n))
    counts = allowed.sum(axis=1)
    kv_count = int(counts[0])
    if not np.all(counts == kv_count):  # guaranteed by the shifted-window rule
        raise AssertionError("window rule produced a ragged key-tile list")
    # np.nonzero walks rows in order, so each row's columns come out sorted.
    kv_tiles = np.nonzero(allowed)[1].reshape(-1, kv_count).astype(np.int32)

    q_count = allowed.sum(axis=0).astype(np.int32)
    max_q = int(q_count.max())
    q_tiles = np.full((allowed.shape[1], max_q), -1, dtype=np.int32)
    for v in range(allowed.shape[1]):
        qs = np.nonzero(allowed[:, v])[0]
        q_tiles[v, : len(qs)] = qs

    tile_valid = slot_valid(grid, tile).sum(axis=1).astype(np.int32)
    for arr in (kv_tiles, q_tiles, q_count, tile_valid):
        arr.flags.writeable = False
    return MaskInfo(
        grid=grid,
        tile=tile,
        window=window,
        tiles=n,
        kv_tiles=kv_tiles,
        kv_count=kv_count,
        tile_valid=tile_valid,
        q_tiles=q_tiles,
        q_count=q_count,
    )


def build_mask_info(grid, tile, window) -> MaskInfo:
    """The (cached) `MaskInfo` of a token grid, tile and window (None = dense)."""
    grid = validate_grid(grid)
    tile = tuple(int(x) for x in tile)
    window = None if window is None else tuple(int(x) for x in window)
    return _build(grid, tile, window)
