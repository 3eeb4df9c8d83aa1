"""Key blocks computed per query block, before and after skipping all-padding blocks (host
arithmetic only, no GPU): the prediction behind issue 17 item 3.

Before: every query block of BLOCK_M slots computes every key block of BLOCK_N slots of its query
tile's key tiles (what `mosaic`, and `triton` before the key-block list, do), all-padding blocks
included: kv_count * Pp / BLOCK_N. After (`triton` now): a query block that is all padding computes
none, the others `key_block_list(...).count` of their tile. With row-major slots inside a tile
("row-major skip") almost no block of 64 slots is all padding at Wan's grids, so skipping alone
saves nothing; valid-first slots ("valid-first skip") gather the padding into whole blocks.
"Real keys / 64" is the floor with the same query-block skipping: the window's real key tokens
over BLOCK_N for every query block holding a real token, 0 for the others, averaged over all
query blocks (what is left above it is padding inside the last, partial key block of edge tiles).

    python benchmarks/block_savings.py
"""

from __future__ import annotations

import math

import numpy as np
from attention import TARGET_SPARSITIES, TILE, pick_window  # benchmarks/ (run from there)

from fpsa_jax.attention.kernel_layout import (
    key_block_list,
    live_query_blocks,
    padded_tile_length,
    slot_tokens,
)
from fpsa_jax.attention.mask import build_mask_info
from fpsa_jax.attention.schedule import StepSchedule
from fpsa_jax.attention.tiling import tile_tokens
from pallas_kernels.triton_fpsa_fwd import BLOCK_N, default_launch

GRIDS = {"480p": (21, 30, 52), "720p": (21, 45, 80)}


def computed_blocks(grid, tile, window, block_m: int, block_n: int, table: np.ndarray) -> float:
    """Mean key blocks computed per query block when all-padding key and query blocks (of the
    slot table `table`, int32 [n_tiles * Pp], -1 padding) are skipped."""
    info = build_mask_info(grid, tile, window)
    n_tiles = info.n_tiles
    pp = table.size // n_tiles
    live_k = (table.reshape(n_tiles, pp // block_n, block_n) >= 0).any(axis=2)  # [n_tiles, kb]
    live_q = (table.reshape(n_tiles, pp // block_m, block_m) >= 0).any(axis=2)  # [n_tiles, qb]
    per_tile = live_k[info.kv_tiles].sum(axis=(1, 2))  # [n_tiles] key blocks of each query tile
    return float((live_q * per_tile[:, None]).sum() / live_q.size)


def row_major_table(grid, tile, pp: int) -> np.ndarray:
    """The slot table of the old layout: row-major slots inside each tile, padding interleaved."""
    tokens = tile_tokens(grid, tile)
    padded = np.full((tokens.shape[0], pp), -1, np.int32)
    padded[:, : tokens.shape[1]] = tokens
    return padded.reshape(-1)


def rows(grid, tile, window):
    pp = padded_tile_length(math.prod(tile), BLOCK_N)
    block_m = default_launch(pp).block_m
    info = build_mask_info(grid, tile, window)
    before = info.kv_count * pp // BLOCK_N
    old = computed_blocks(grid, tile, window, block_m, BLOCK_N, row_major_table(grid, tile, pp))
    new = computed_blocks(grid, tile, window, block_m, BLOCK_N, slot_tokens(grid, tile, pp))
    # The kernel's own table must agree with this count for the live query blocks.
    lists = key_block_list(grid, tile, window, pp, BLOCK_N)
    assert lists.count.max() <= before
    live_q = live_query_blocks(grid, tile, pp, block_m)  # [n_tiles, Pp / BLOCK_M]
    real_keys = info.tile_valid[info.kv_tiles].sum(axis=1) / BLOCK_N  # [n_tiles]
    floor = float((live_q * real_keys[:, None]).sum() / live_q.size)
    return before, old, new, floor


def main():
    print("| grid | window | density | before | row-major skip | valid-first skip | saved |"
          " real keys / 64 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for res, grid in GRIDS.items():
        windows = [("full", None)]
        windows += [(f"~{s:.0%} sparse", pick_window(grid, TILE, s)) for s in TARGET_SPARSITIES]
        for i, phase in enumerate(StepSchedule.preset(f"wan-{res}").phases):
            windows.append((f"wan-{res} phase {i}", phase.config.window))
        for label, window in windows:
            before, old, new, floor = rows(grid, TILE, window)
            info = build_mask_info(grid, TILE, window)
            print(
                f"| {res} | {label} {window} | {info.density:.3f} | {before} | {old:.1f} | "
                f"{new:.1f} | {1 - new / before:.1%} | {floor:.1f} |"
            )


if __name__ == "__main__":
    main()
