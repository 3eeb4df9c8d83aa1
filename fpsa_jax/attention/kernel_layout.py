"""The Triton kernels' data layout: tile reorder, FP8 quantization and the way back.

The pre-pass runs in XLA (one jit-fused pass over Q, K, V) and produces exactly the FP8 values and
scales of `fpsa_jax.attention.quant` (it calls its scale functions), laid out for the kernels:

- Q, K values: [B, N, Lp, D] with Lp = n_tiles * Pp; slot r of tile u sits at row u * Pp + r. The
  tile volume P is padded to Pp (a multiple of the kernel's key block); padded slots are zero.
- V values: [B, N, D, Lp], transposed so that the P.V dot reads V K-major (FP8 wgmma needs it).
- q_scale, k_scale: float32 [B, N, n_tiles], the scale of each tile's quantization group.
- v_scale: float32 [B, N, D], one per channel.
- key_bias: float32 [Lp], 0 for real key slots and -inf for padding (edge tiles have holes in the
  middle of a tile, not only at its end, so a per-tile count is not enough).

With quant="none" (16-bit inputs only) the values keep the input dtype and every scale is 1.
Shapes: B batch, L tokens, N heads, D head dim, P tokens per tile, Pp padded tile length.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax.attention.config import FPSAConfig
from fpsa_jax.attention.quant import channel_scales, tile_group_scales, to_e4m3
from fpsa_jax.attention.tiling import from_tiles, slot_valid, tile_grid, to_tiles


def padded_tile_length(p: int, multiple: int) -> int:
    """Pp: the tile volume P rounded up to a multiple of `multiple` (the kernel's key block)."""
    return -(-p // multiple) * multiple


def to_kernel_layout(x: jax.Array, grid, tile, pp: int) -> jax.Array:
    """[B, L, N, D] token order -> [B, N, n_tiles * Pp, D] tile major, padded slots zero."""
    return _tiles_to_kernel_layout(to_tiles(x, grid, tile), pp)


def from_kernel_layout(x: jax.Array, grid, tile, pp: int) -> jax.Array:
    """Inverse of `to_kernel_layout`: [B, N, Lp, D] -> [B, L, N, D], padded slots dropped."""
    b, n, _, d = x.shape
    n_tiles, p = math.prod(tile_grid(grid, tile)), math.prod(tile)
    x = x.reshape(b, n, n_tiles, pp, d)[:, :, :, :p]
    return from_tiles(jnp.einsum("bnupd->bupnd", x), grid, tile)


def _tiles_to_kernel_layout(xt: jax.Array, pp: int) -> jax.Array:
    """[B, n_tiles, P, N, D] -> [B, N, n_tiles * Pp, D], padding each tile with zero slots."""
    b, n_tiles, p, n, d = xt.shape
    xt = jnp.pad(xt, ((0, 0), (0, 0), (0, pp - p), (0, 0), (0, 0)))
    return jnp.einsum("bupnd->bnupd", xt).reshape(b, n, n_tiles * pp, d)


def key_bias(grid, tile, pp: int) -> np.ndarray:
    """float32 [n_tiles * Pp]: 0 for slots holding a token, -inf for padding (host array)."""
    valid = slot_valid(grid, tile)  # [n_tiles, P]
    padded = np.zeros((valid.shape[0], pp), dtype=bool)
    padded[:, : valid.shape[1]] = valid
    return np.where(padded, 0.0, -np.inf).astype(np.float32).reshape(-1)


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
    per_token = jnp.abs(x.astype(jnp.float32)).max(axis=-1, keepdims=True)
    tiles = tile_grid(grid, tile)
    return jax.lax.stop_gradient(
        tile_group_scales(to_tiles(per_token, grid, tile), valid, tiles, group)
    )


def quantize_for_kernel(q, k, v, grid, config: FPSAConfig, *, block_n: int) -> KernelOperands:
    """Reorders Q, K, V tile-major, quantizes them as FPSA does, lays them out for the kernel.

    Args:
      q, k, v: [B, L, N, D], L = T * H * W in row-major (t, h, w) order.
      grid: (T, H, W).
      config: the operator; quant "fp8" (E4M3 values) or "none" (values keep q's dtype).
      block_n: the kernel's key block; the tile volume is padded to a multiple of it.

    Returns:
      `KernelOperands`.
    """
    tile = config.tile
    tiles = tile_grid(grid, tile)
    n_tiles = math.prod(tiles)
    pp = padded_tile_length(math.prod(tile), block_n)
    valid = slot_valid(grid, tile)  # host bool [n_tiles, P]
    b, _, n_heads, d = q.shape

    qt, kt, vt = (to_tiles(x, grid, tile) for x in (q, k, v))  # padded slots are zero
    if config.quant == "fp8":
        q_scale = _tile_scales(q, grid, tile, valid, config.q_group)  # [B, n_tiles, 1, N, 1]
        k_scale = _tile_scales(k, grid, tile, valid, config.k_group)
        v_scale = channel_scales(v)  # [B, 1, N, D], over all tokens as quant.quantize_channels
        q_vals = to_e4m3(qt.astype(jnp.float32) / q_scale)
        k_vals = to_e4m3(kt.astype(jnp.float32) / k_scale)
        v_vals = to_e4m3(vt.astype(jnp.float32) / v_scale[:, None])
        q_scale = q_scale.reshape(b, n_tiles, n_heads).transpose(0, 2, 1)
        k_scale = k_scale.reshape(b, n_tiles, n_heads).transpose(0, 2, 1)
        v_scale = v_scale.reshape(b, n_heads, d)
    else:
        q_vals, k_vals, v_vals = qt, kt, vt
        q_scale = k_scale = jnp.ones((b, n_heads, n_tiles), jnp.float32)
        v_scale = jnp.ones((b, n_heads, d), jnp.float32)

    return KernelOperands(
        q=_tiles_to_kernel_layout(q_vals, pp),
        k=_tiles_to_kernel_layout(k_vals, pp),
        v_t=jnp.swapaxes(_tiles_to_kernel_layout(v_vals, pp), 2, 3),
        q_scale=q_scale.astype(jnp.float32),
        k_scale=k_scale.astype(jnp.float32),
        v_scale=v_scale.astype(jnp.float32),
        key_bias=jnp.asarray(key_bias(grid, tile, pp)),
        grid=tuple(grid),
        tile=tuple(tile),
        padded_tile=pp,
    )


def output_from_kernel(o: jax.Array, ops: KernelOperands) -> jax.Array:
    """Kernel output [B, N, Lp, D] -> [B, L, N, D] in token order (padded slots dropped)."""
    return from_kernel_layout(o, ops.grid, ops.tile, ops.padded_tile)
