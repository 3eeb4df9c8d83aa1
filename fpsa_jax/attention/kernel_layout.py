"""The Hopper kernels' data layout: tile reorder, FP8 quantization and the way back.

The pre-pass produces exactly the FP8 values and scales of `fpsa_jax.attention.quant` (it calls
its scale functions), laid out for the kernels. The scales are small reductions in XLA; the
values are written either by XLA (prepass="xla": one jit-fused gather + cast per tensor, the
definition, runs anywhere) or by the Triton pre-pass kernel (prepass="triton",
`pallas_kernels.triton_fpsa_prepass`: the same values, faster on the GPU). With
prepass="triton_scales" that kernel also finds Q's and K's scales where a quantization group is
one tile (the default), sparing XLA's reductions a full read of each (other groups: as
"triton"); the same bits again. All of them, and `to_kernel_layout` / `from_kernel_layout`, are
driven by one table, `slot_tokens`.

The layout:

- Slots: tile u owns slots [u * Pp, (u + 1) * Pp), Lp = n_tiles * Pp; the tile volume P is padded
  to Pp (a multiple of the kernel's key block). Inside a tile the slots are **valid first**: the
  tile's real tokens in their row-major (t, h, w) order, then its padding (`slot_tokens`). So an
  edge tile's padding sits in one run at the end of the tile, and whole key (and query) blocks
  there hold only padding: `key_block_list` leaves those key blocks out, and a query block whose
  first slot is padding is all padding. Padded slots hold zeros.
- Q, K values: [B, N, Lp, D]. V values: [B, N, D, Lp], transposed so that the P.V dot reads V
  K-major (FP8 wgmma needs it).
- q_scale, k_scale: float32 [B, N, n_tiles], the scale of each tile's quantization group (a max
  over the tile's valid tokens: the slot order does not change it). v_scale: float32 [B, N, D],
  one per channel.
- key_bias: float32 [Lp], 0 for real key slots and -inf for padding (a key block may still mix
  real and padded slots, at the boundary of the padding run).

With quant="none" (16-bit inputs only) the values keep the input dtype and every scale is 1.
Shapes: B batch, L tokens, N heads, D head dim, P tokens per tile, Pp padded tile length.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax.attention.config import FPSAConfig
from fpsa_jax.attention.mask import build_mask_info
from fpsa_jax.attention.quant import channel_scales, finite_abs, tile_group_scales, to_e4m3
from fpsa_jax.attention.tiling import slot_valid, tile_grid, tile_tokens, to_tiles


def padded_tile_length(p: int, multiple: int) -> int:
    """Pp: the tile volume P rounded up to a multiple of `multiple` (the kernel's key block)."""
    return -(-p // multiple) * multiple


def to_kernel_layout(x: jax.Array, grid, tile, pp: int) -> jax.Array:
    """[B, L, N, D] token order -> [B, N, n_tiles * Pp, D] kernel layout (a gather by
    `slot_tokens`), padded slots zero."""
    if x.shape[1] != math.prod(grid):
        raise ValueError(f"to_kernel_layout: L={x.shape[1]} != T*H*W={math.prod(grid)} for {grid}")
    table = slot_tokens(grid, tile, pp)
    xk = jnp.take(x, jnp.asarray(np.maximum(table, 0)), axis=1)  # [B, Lp, N, D]
    xk = jnp.where(jnp.asarray(table >= 0)[None, :, None, None], xk, jnp.zeros((), x.dtype))
    return jnp.einsum("blnd->bnld", xk)


def from_kernel_layout(x: jax.Array, grid, tile, pp: int) -> jax.Array:
    """Inverse of `to_kernel_layout`: [B, N, Lp, D] -> [B, L, N, D] (a gather by
    `token_slots`), padded slots dropped."""
    xt = jnp.take(x, jnp.asarray(token_slots(grid, tile, pp)), axis=2)  # [B, N, L, D]
    return jnp.einsum("bnld->blnd", xt)


@functools.lru_cache(maxsize=256)
def _slot_tokens(grid: tuple, tile: tuple, pp: int) -> np.ndarray:
    tokens = tile_tokens(grid, tile)  # [n_tiles, P], row-major inside each tile, -1 padding
    if pp < tokens.shape[1]:
        raise ValueError(f"padded tile length {pp} < tile volume {tokens.shape[1]}")
    # A stable sort on "is padding" moves the valid tokens first, each run in its own order.
    order = np.argsort(tokens < 0, axis=1, kind="stable")
    padded = np.full((tokens.shape[0], pp), -1, dtype=np.int32)
    padded[:, : tokens.shape[1]] = np.take_along_axis(tokens, order, axis=1)
    padded = padded.reshape(-1)
    padded.flags.writeable = False  # cached: callers must not mutate it
    return padded


def slot_tokens(grid, tile, pp: int) -> np.ndarray:
    """int32 [n_tiles * Pp] (read-only, cached): the token each kernel slot holds, -1 for padding;
    valid first inside each tile (module docstring). The gather table of both pre-passes and
    `to_kernel_layout`, and the scatter table of the token-order outputs."""
    return _slot_tokens(tuple(int(g) for g in grid), tuple(int(t) for t in tile), int(pp))


@functools.lru_cache(maxsize=256)
def _token_slots(grid: tuple, tile: tuple, pp: int) -> np.ndarray:
    table = _slot_tokens(grid, tile, pp)
    slots = np.empty(math.prod(grid), np.int32)
    real = np.nonzero(table >= 0)[0]
    slots[table[real]] = real
    slots.flags.writeable = False
    return slots


def token_slots(grid, tile, pp: int) -> np.ndarray:
    """int32 [L] (read-only, cached): the kernel slot of each token, the inverse of
    `slot_tokens` (the gather table of `from_kernel_layout`)."""
    return _token_slots(tuple(int(g) for g in grid), tuple(int(t) for t in tile), int(pp))


def key_block_valid_slots(grid, tile, pp: int, block: int) -> np.ndarray:
    """int32 [n_tiles * Pp / block] (host array): the real slots of each block of `block`
    consecutive key slots. Slots are valid first within a tile, so they are the block's first
    ones and its padding (key bias -inf) the rest: a kernel can mask columns from this count on
    instead of reading the bias."""
    return (slot_tokens(grid, tile, pp).reshape(-1, block) >= 0).sum(axis=1).astype(np.int32)


def key_bias(grid, tile, pp: int) -> np.ndarray:
    """float32 [n_tiles * Pp]: 0 for slots holding a token, -inf for padding (host array)."""
    return np.where(slot_tokens(grid, tile, pp) >= 0, 0.0, -np.inf).astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class KeyBlockList:
    """Per query tile, the key blocks that hold at least one real token (read-only host arrays).

    Key block b is the `block` consecutive key slots [b * block, (b + 1) * block) of the kernel
    layout; it lies in key tile b // (Pp / block). With valid-first slots, the blocks this list
    leaves out are exactly the all-padding ones at the end of edge tiles.

    Attributes:
      blocks: int32 [n_tiles, max_blocks]; row u lists, in increasing order, the absolute key
        blocks of query tile u's key tiles (`MaskInfo.kv_tiles[u]`) that hold a real token,
        padded at the end with -1.
      count: int32 [n_tiles]; real entries of each row of `blocks`.
      block: key slots per block.
      padded_tile: Pp.
    """

    blocks: np.ndarray
    count: np.ndarray
    block: int
    padded_tile: int

    @property
    def blocks_per_tile(self) -> int:
        return self.padded_tile // self.block


@functools.lru_cache(maxsize=256)
def _key_block_list(grid, tile, window, pp: int, block: int) -> KeyBlockList:
    if pp % block:
        raise ValueError(f"padded tile length {pp} is not a multiple of the key block {block}")
    kv_tiles = build_mask_info(grid, tile, window).kv_tiles  # [n_tiles, K]
    kb = pp // block
    live = (_slot_tokens(grid, tile, pp).reshape(-1, kb, block) >= 0).any(axis=2)  # [n_tiles, kb]
    n_tiles = kv_tiles.shape[0]
    candidates = (kv_tiles[:, :, None] * kb + np.arange(kb)).reshape(n_tiles, -1)
    keep = live[kv_tiles].reshape(n_tiles, -1)
    count = keep.sum(axis=1).astype(np.int32)
    # kv_tiles rows are increasing, so candidates rows are too; a stable sort on "dropped" keeps
    # the kept blocks first, in order.
    order = np.argsort(~keep, axis=1, kind="stable")
    blocks = np.take_along_axis(candidates, order, axis=1)[:, : int(count.max())]
    blocks = np.where(np.arange(blocks.shape[1]) < count[:, None], blocks, -1).astype(np.int32)
    for arr in (blocks, count):
        arr.flags.writeable = False
    return KeyBlockList(blocks=blocks, count=count, block=block, padded_tile=pp)


def key_block_list(grid, tile, window, pp: int, block: int) -> KeyBlockList:
    """The (cached) `KeyBlockList` of a token grid, tile, window (None = dense), padded tile
    length Pp and key block: built once on the host from `MaskInfo.kv_tiles` and `slot_tokens`."""
    grid = tuple(int(g) for g in grid)
    tile = tuple(int(t) for t in tile)
    window = None if window is None else tuple(int(w) for w in window)
    return _key_block_list(grid, tile, window, int(pp), int(block))


def live_query_blocks(grid, tile, pp: int, block: int) -> np.ndarray:
    """bool [n_tiles, Pp / block]: whether each query block of `block` slots holds a real token
    (valid first: exactly when its first slot does). Kernels that skip the rest read it off
    key_bias at the block's first slot; this host copy is for counting and tests."""
    return (slot_tokens(grid, tile, pp).reshape(-1, pp // block, block) >= 0).any(axis=2)


@flax.struct.dataclass
class KernelOperands:
    """Q, K, V in the Triton kernels' layout (see the module docstring for shapes and dtypes).

    x ~= values * scale broadcast per tile (Q, K) or per channel (V). The static fields describe
    the layout: grid (T, H, W), tile (tt, th, tw) and the padded tile length Pp.
    """

    q: jax.Array
    k: jax.Array
    v_t: jax.Array
    q_scale: jax.Array
    k_scale: jax.Array
    v_scale: jax.Array
    key_bias: jax.Array
    grid: tuple = flax.struct.field(pytree_node=False, default=(1, 1, 1))
    tile: tuple = flax.struct.field(pytree_node=False, default=(1, 1, 1))
    padded_tile: int = flax.struct.field(pytree_node=False, default=1)

    def dequantized(self, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(q_hat, k_hat, v_hat) [B, N, Lp, D] in `dtype`, still in the kernel layout (V not
        transposed): the values the forward's matmuls multiplied, scales applied."""
        pp = self.padded_tile

        def per_tile(x, scale):  # [B, N, Lp, D] values, [B, N, n_tiles] scales
            s = jnp.repeat(scale, pp, axis=2)[..., None]
            return (x.astype(jnp.float32) * s).astype(dtype)

        v = jnp.swapaxes(self.v_t, 2, 3).astype(jnp.float32) * self.v_scale[:, :, None, :]
        return per_tile(self.q, self.q_scale), per_tile(self.k, self.k_scale), v.astype(dtype)

    def dequantize(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(q_hat, k_hat, v_hat) float32 [B, L, N, D] in token order: the kernel's exact inputs."""
        return tuple(
            from_kernel_layout(x, self.grid, self.tile, self.padded_tile)
            for x in self.dequantized(jnp.float32)
        )


def _tile_scales(x, grid, tile, valid, group) -> jax.Array:
    """`quant.tile_group_scales` of x [B, L, N, D], reduced over D in token order first.

    The same scales (a max is exact in any order), but the full-size read happens once in x's own
    layout and only the [B, L, N, 1] per-token maxima get reordered into tiles, so XLA can fuse the
    big reorder with the cast instead of materialising a reordered copy for the reduction.
    """
    per_token = finite_abs(x).max(axis=-1, keepdims=True)
    tiles = tile_grid(grid, tile)
    return jax.lax.stop_gradient(
        tile_group_scales(to_tiles(per_token, grid, tile), valid, tiles, group)
    )


PREPASSES = ("xla", "triton", "triton_scales")


def kernel_scales(q, k, v, grid, config: FPSAConfig):
    """(q_scale, k_scale [B, N, n_tiles], v_scale [B, N, D]), float32: FPSA's FP8 scales (all 1
    for quant="none"). Small reductions; the full-size read of each tensor is in its own layout."""
    b, _, n_heads, d = q.shape
    n_tiles = math.prod(tile_grid(grid, config.tile))
    if config.quant != "fp8":
        ones = jnp.ones((b, n_heads, n_tiles), jnp.float32)
        return ones, ones, jnp.ones((b, n_heads, d), jnp.float32)
    valid = slot_valid(grid, config.tile)  # host bool [n_tiles, P]
    qk = [
        _tile_scales(x, grid, config.tile, valid, group)  # [B, n_tiles, 1, N, 1]
        .reshape(b, n_tiles, n_heads)
        .transpose(0, 2, 1)
        for x, group in ((q, config.q_group), (k, config.k_group))
    ]
    return qk[0], qk[1], _channel_scales(v)


def _channel_scales(v) -> jax.Array:
    """V's scales float32 [B, N, D]: over all tokens, as quant.quantize_channels."""
    return channel_scales(v).reshape(v.shape[0], *v.shape[2:])


def quantize_for_kernel(
    q, k, v, grid, config: FPSAConfig, *, block_n: int, prepass: str = "xla"
) -> KernelOperands:
    """Reorders Q, K, V tile-major, quantizes them as FPSA does, lays them out for the kernel.

    Args:
      q, k, v: [B, L, N, D], L = T * H * W in row-major (t, h, w) order.
      grid: (T, H, W).
      config: the operator; quant "fp8" (E4M3 values) or "none" (values keep q's dtype).
      block_n: the kernel's key block; the tile volume is padded to a multiple of it.
      prepass: who writes the values: "xla" (anywhere; the definition), "triton" (the pre-pass
        kernel: a GPU with jax-triton, block_n a multiple of 64) or "triton_scales" (that kernel
        finding Q's and K's one-tile-group scales too). All give the same operands.

    Returns:
      `KernelOperands`.
    """
    if prepass not in PREPASSES:
        raise ValueError(f"prepass must be one of {PREPASSES}, got {prepass!r}")
    tile = config.tile
    pp = padded_tile_length(math.prod(tile), block_n)
    fp8 = config.quant == "fp8"
    one_tile_groups = config.q_group == config.k_group == (1, 1, 1)
    if prepass == "triton_scales" and fp8 and one_tile_groups:
        q_vals, q_scale = _values_and_tile_scales_triton(q, grid, tile, pp)
        k_vals, k_scale = _values_and_tile_scales_triton(k, grid, tile, pp)
        v_scale = _channel_scales(v)
        v_t = _values_triton(v, v_scale, grid, tile, pp, mode="channel", transposed=True)
        scales = (q_scale, k_scale, v_scale)
    else:
        scales = kernel_scales(q, k, v, grid, config)
        write = _values_xla if prepass == "xla" else _values_triton
        q_vals, k_vals, v_t = (
            write(x, s, grid, tile, pp, mode=mode if fp8 else "none", transposed=mode == "channel")
            for x, s, mode in zip((q, k, v), scales, ("tile", "tile", "channel"), strict=True)
        )
    return KernelOperands(
        q=q_vals,
        k=k_vals,
        v_t=v_t,
        q_scale=scales[0],
        k_scale=scales[1],
        v_scale=scales[2],
        key_bias=jnp.asarray(key_bias(grid, tile, pp)),
        grid=tuple(grid),
        tile=tuple(tile),
        padded_tile=pp,
    )


def _values_xla(x, scale, grid, tile, pp: int, *, mode: str, transposed: bool) -> jax.Array:
    """x [B, L, N, D] -> kernel-layout values [B, N, Lp, D] ([B, N, D, Lp] if transposed):
    E4M3 of x / scale per tile (mode "tile", scale [B, N, n_tiles]) or per channel ("channel",
    scale [B, N, D]), or x itself ("none"). In XLA: a gather by `slot_tokens`, as the Triton
    pre-pass does."""
    values = to_kernel_layout(x, grid, tile, pp)  # [B, N, Lp, D], padded slots zero
    if mode == "tile":
        values = to_e4m3(values.astype(jnp.float32) / jnp.repeat(scale, pp, axis=2)[..., None])
    elif mode == "channel":
        values = to_e4m3(values.astype(jnp.float32) / scale[:, :, None, :])
    return jnp.swapaxes(values, 2, 3) if transposed else values


def _values_triton(x, scale, grid, tile, pp: int, *, mode: str, transposed: bool) -> jax.Array:
    """`_values_xla` by the Triton pre-pass kernel (one read of x, one write)."""
    from pallas_kernels.triton_fpsa_prepass import relayout

    table = slot_tokens(grid, tile, pp)
    return relayout(x, scale, table, padded_tile=pp, scale_mode=mode, transposed=transposed)


def _values_and_tile_scales_triton(x, grid, tile, pp: int) -> tuple[jax.Array, jax.Array]:
    """(values [B, N, Lp, D], scales float32 [B, N, n_tiles]) of Q or K at one-tile groups, by
    the Triton pre-pass kernel alone (`relayout_with_tile_scales`)."""
    from pallas_kernels.triton_fpsa_prepass import relayout_with_tile_scales

    values, scales = relayout_with_tile_scales(x, slot_tokens(grid, tile, pp), padded_tile=pp)
    return values, jax.lax.stop_gradient(scales)


def output_from_kernel(o: jax.Array, ops: KernelOperands) -> jax.Array:
    """Kernel output [B, N, Lp, D] -> [B, L, N, D] in token order (padded slots dropped)."""
    return from_kernel_layout(o, ops.grid, ops.tile, ops.padded_tile)
