"""The Triton kernels' data layout: tile reorder, FP8 quantization and the way back.

The pre-pass produces exactly the FP8 values and scales of `fpsa_jax.attention.quant` (it calls
its scale functions), laid out for the kernels. The scales are small reductions in XLA; the
values are written either by XLA (prepass="xla": one jit-fused reorder + cast per tensor, the
definition, runs anywhere) or by the Triton pre-pass kernel (prepass="triton",
`pallas_kernels.triton_fpsa_prepass`: the same values, faster on the GPU). The layout:

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
from fpsa_jax.attention.quant import channel_scales, finite_abs, tile_group_scales, to_e4m3
from fpsa_jax.attention.tiling import from_tiles, slot_valid, tile_grid, tile_tokens, to_tiles


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


def slot_tokens(grid, tile, pp: int) -> np.ndarray:
    """int32 [n_tiles * Pp]: the token each kernel slot holds, -1 for padding (`tiling.tile_tokens`
    with every tile padded to Pp slots): the gather table of the Triton pre-pass and the scatter
    table of the forward's token-order output."""
    tokens = tile_tokens(tuple(grid), tuple(tile))
    padded = np.full((tokens.shape[0], pp), -1, dtype=np.int32)
    padded[:, : tokens.shape[1]] = tokens
    return padded.reshape(-1)


def padded_key_blocks(grid, tile, pp: int, block: int) -> np.ndarray:
    """int32 [n_tiles * Pp / block]: 1 where a block of `block` consecutive key slots holds a
    padding slot (its key bias has a -inf), else 0 (host array): kernels skip the bias there."""
    return (slot_tokens(grid, tile, pp).reshape(-1, block) < 0).any(axis=1).astype(np.int32)


def key_bias(grid, tile, pp: int) -> np.ndarray:
    """float32 [n_tiles * Pp]: 0 for slots holding a token, -inf for padding (host array)."""
    return np.where(slot_tokens(grid, tile, pp) >= 0, 0.0, -np.inf).astype(np.float32)


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


PREPASSES = ("xla", "triton")


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
    # V: over all tokens, as quant.quantize_channels.
    return qk[0], qk[1], channel_scales(v).reshape(b, n_heads, d)


def quantize_for_kernel(
    q, k, v, grid, config: FPSAConfig, *, block_n: int, prepass: str = "xla"
) -> KernelOperands:
    """Reorders Q, K, V tile-major, quantizes them as FPSA does, lays them out for the kernel.

    Args:
      q, k, v: [B, L, N, D], L = T * H * W in row-major (t, h, w) order.
      grid: (T, H, W).
      config: the operator; quant "fp8" (E4M3 values) or "none" (values keep q's dtype).
      block_n: the kernel's key block; the tile volume is padded to a multiple of it.
      prepass: who writes the values: "xla" (anywhere; the definition) or "triton" (the pre-pass
        kernel: a GPU with jax-triton, block_n a multiple of 64). Both give the same operands.

    Returns:
      `KernelOperands`.
    """
    if prepass not in PREPASSES:
        raise ValueError(f"prepass must be one of {PREPASSES}, got {prepass!r}")
    tile = config.tile
    pp = padded_tile_length(math.prod(tile), block_n)
    scales = kernel_scales(q, k, v, grid, config)
    write = _values_triton if prepass == "triton" else _values_xla
    fp8 = config.quant == "fp8"
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
    scale [B, N, D]), or x itself ("none"). In XLA."""
    xt = to_tiles(x, grid, tile)  # [B, n_tiles, P, N, D], padded slots zero
    if mode == "tile":
        xt = to_e4m3(xt.astype(jnp.float32) / jnp.swapaxes(scale, 1, 2)[:, :, None, :, None])
    elif mode == "channel":
        xt = to_e4m3(xt.astype(jnp.float32) / scale[:, None, None])
    values = _tiles_to_kernel_layout(xt, pp)
    return jnp.swapaxes(values, 2, 3) if transposed else values


def _values_triton(x, scale, grid, tile, pp: int, *, mode: str, transposed: bool) -> jax.Array:
    """`_values_xla` by the Triton pre-pass kernel (one read of x, one write)."""
    from pallas_kernels.triton_fpsa_prepass import relayout

    table = slot_tokens(grid, tile, pp)
    return relayout(x, scale, table, padded_tile=pp, scale_mode=mode, transposed=transposed)


def output_from_kernel(o: jax.Array, ops: KernelOperands) -> jax.Array:
    """Kernel output [B, N, Lp, D] -> [B, L, N, D] in token order (padded slots dropped)."""
    return from_kernel_layout(o, ops.grid, ops.tile, ops.padded_tile)
