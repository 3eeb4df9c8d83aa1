"""FP8 (E4M3) quantization of Q, K, V and P as FPSA specifies it.

- Q, K: one scale per (batch, head, group of tiles); s = absmax over the group's valid tokens / 448
  (s = 1 for an all-zero group); x_hat = e4m3(x / s) * s. Absmaxes skip inf and NaN
  (`finite_abs`): an inf saturates to the group's largest finite magnitude.
- V: one scale per (batch, head, channel) over all valid tokens.
- P: p_hat = e4m3(p * scale) / scale with a static scale (448 by default).

The `fake_*` helpers return dequantized values with a straight-through gradient (the identity),
which is how training sees quantization; `quantize_*` return a `QuantizedTensor` for kernels.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax.attention.config import E4M3_MAX, Int3

FP8 = jnp.float8_e4m3fn


@flax.struct.dataclass
class QuantizedTensor:
    """FP8 values with their float32 scales: x ~= values.astype(f32) * scales (broadcast).

    Attributes:
      values: E4M3 values, the layout's shape (e.g. [B, n_tiles, P, N, D] for "tiles"):
        float8_e4m3fn, or float32 holding E4M3 values exactly where a consumer emulates FP8
        (the emulated FP8 linears of `fpsa_jax.model.fp8_linear`).
      scales: float32, broadcastable against `values` ([B, n_tiles, 1, N, 1] for Q/K per tile
        group, [B, 1, N, D] for V per channel in token layout).
      layout: static description of `values` and `scales`, e.g. "tiles:group=(1,1,1)" or
        "tokens:channel".
    """

    values: jax.Array
    scales: jax.Array
    layout: str = flax.struct.field(pytree_node=False, default="")

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return (self.values.astype(jnp.float32) * self.scales).astype(dtype)


E4M3_MIN_NORMAL = 2.0**-6
E4M3_SUBNORMAL_STEP = 2.0**-9


def e4m3_round(x: jax.Array) -> jax.Array:
    """Rounds float32 values to the nearest E4M3 value (round-to-nearest-even), back in float32.

    Inputs are clipped to +-448 first: E4M3 has no infinity and an overflowing cast would give NaN.
    Callers scale into range, so the clip only absorbs float32 round-off at the top (448.00003).

    Arithmetic, not a cast round trip: inside a jit, XLA on GPU (default
    `xla_allow_excess_precision`) deletes f32 -> f8 -> f32 convert pairs, which silently skipped
    the rounding (measured on an H100 with jax 0.11.2). Normal values keep 3 mantissa bits
    (`reduce_precision` with a wider exponent, so 256..448 stay finite); below 2^-6 E4M3 is
    subnormal with a fixed step of 2^-9, rounded to nearest even by `jnp.round`.
    """
    x = jnp.clip(x.astype(jnp.float32), -E4M3_MAX, E4M3_MAX)
    normal = jax.lax.reduce_precision(x, exponent_bits=5, mantissa_bits=3)
    subnormal = jnp.round(x / E4M3_SUBNORMAL_STEP) * E4M3_SUBNORMAL_STEP
    return jnp.where(jnp.abs(x) < E4M3_MIN_NORMAL, subnormal, normal)


def to_e4m3(x: jax.Array) -> jax.Array:
    """float32 values (within +-448 after clipping) -> float8_e4m3fn, rounded to nearest even.

    Rounds with `e4m3_round` first so the cast itself is exact: whatever XLA does with a later
    upcast inside the same jit, the values are the E4M3 ones.
    """
    return e4m3_round(x).astype(FP8)


def straight_through(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """x_hat in the forward pass, the identity's gradient in the backward (the straight-through
    estimator): how a quantized x_hat of x is seen by training. Where x is inf or NaN the
    forward is x_hat as well (x + (x_hat - x) would be NaN there) and the gradient 0."""
    through = x + jax.lax.stop_gradient(x_hat - x)
    return jnp.where(jnp.isfinite(x), through, jax.lax.stop_gradient(x_hat))


def finite_abs(x: jax.Array) -> jax.Array:
    """|x| in float32, 0 where x is inf or NaN: what every absmax scale is taken over. One inf
    would otherwise make its group's scale inf, and x / s then 0 or NaN for every value of the
    group (a whole head NaN, as every query attends the group). With it an inf value saturates to
    +-448 * s, the group's largest finite magnitude (E4M3 has no infinity), and a NaN stays NaN
    in its own entry only."""
    x = x.astype(jnp.float32)
    return jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0)


E4M3_MAX_INVERSE = np.float32(1.0 / E4M3_MAX)


def safe_scale(amax: jax.Array) -> jax.Array:
    """absmax / 448, with 1 where the block is all zero (so 0 / s stays 0, never NaN).

    Computed as absmax * float32(1 / 448), one rounding that every backend and kernel repeats
    bit for bit: XLA turns a division by 448 into that product on the CPU but need not elsewhere.
    """
    amax = jnp.asarray(amax, jnp.float32)
    return jnp.where(amax > 0, amax * E4M3_MAX_INVERSE, 1.0).astype(jnp.float32)


def center_keys(k: jax.Array) -> jax.Array:
    """k [B, L, N, D] minus its mean over L per (batch, head, channel), in k's dtype (mean and
    difference in float32; the mean of the finite entries): `FPSAConfig.smooth_k`. Raises for
    float8 keys (the centred keys would be rounded to float8 again)."""
    if jnp.dtype(k.dtype).itemsize < 2:
        raise ValueError(f"smooth_k needs 16- or 32-bit keys to centre, got {k.dtype}")
    kf = k.astype(jnp.float32)
    # The mean of the finite keys only, so an inf key stays one (and FP8 saturates it as
    # without centring) instead of turning its whole (batch, head, channel) into NaN.
    finite = jnp.isfinite(kf)
    count = jnp.maximum(finite.sum(axis=1, keepdims=True), 1)
    mean = jnp.where(finite, kf, 0.0).sum(axis=1, keepdims=True) / count
    return (kf - mean).astype(k.dtype)


def tile_group_scales(x: jax.Array, valid: np.ndarray, tiles: Int3, group: Int3) -> jax.Array:
    """Per-(batch, tile-group, head) scales, broadcast back to tiles.

    Args:
      x: [B, n_tiles, P, N, D] tile-major values.
      valid: bool [n_tiles, P]; padded slots do not count towards the absmax.
      tiles: tile grid (nt, nh, nw).
      group: tiles per group along each axis.

    Returns:
      float32 [B, n_tiles, 1, N, 1]: the scale of each tile's group.
    """
    b, _, _, n_heads, _ = x.shape
    nt, nh, nw = tiles
    gt, gh, gw = group
    absx = jnp.where(jnp.asarray(valid)[None, :, :, None, None], finite_abs(x), 0)
    amax = absx.max(axis=(2, 4)).reshape(b, nt, nh, nw, n_heads)  # per tile
    # Pad the tile grid to whole groups with zeros (absmax ignores them), then reduce each group.
    ct, ch, cw = math.ceil(nt / gt), math.ceil(nh / gh), math.ceil(nw / gw)
    amax = jnp.pad(amax, ((0, 0), (0, ct * gt - nt), (0, ch * gh - nh), (0, cw * gw - nw), (0, 0)))
    amax = amax.reshape(b, ct, gt, ch, gh, cw, gw, n_heads).max(axis=(2, 4, 6))
    scales = safe_scale(amax)  # [B, ct, ch, cw, N]
    # Back to one scale per tile: tile u belongs to group u // g on each axis.
    it, ih, iw = (np.arange(na) // ga for na, ga in zip(tiles, group, strict=True))
    scales = scales[:, it][:, :, ih][:, :, :, iw]  # [B, nt, nh, nw, N]
    return scales.reshape(b, nt * nh * nw, 1, n_heads, 1)


def quantize_tiles(x: jax.Array, valid: np.ndarray, tiles: Int3, group: Int3) -> QuantizedTensor:
    """Q or K in tile layout [B, n_tiles, P, N, D] -> FP8 with one scale per group of tiles."""
    scales = jax.lax.stop_gradient(tile_group_scales(x, valid, tiles, group))
    values = to_e4m3(x.astype(jnp.float32) / scales)
    return QuantizedTensor(values, scales, layout=f"tiles:group={tuple(group)}")


def channel_scales(x: jax.Array) -> jax.Array:
    """V in token layout [B, L, N, D] -> float32 [B, 1, N, D], one per (batch, head, channel)."""
    return safe_scale(finite_abs(x).max(axis=1, keepdims=True))


def quantize_channels(x: jax.Array) -> QuantizedTensor:
    """V in token layout [B, L, N, D] (every token valid) -> FP8 with per-channel scales."""
    scales = jax.lax.stop_gradient(channel_scales(x))
    values = to_e4m3(x.astype(jnp.float32) / scales)
    return QuantizedTensor(values, scales, layout="tokens:channel")


def fake_quant_tiles(x: jax.Array, valid: np.ndarray, tiles: Int3, group: Int3) -> jax.Array:
    """Dequantized Q or K (float32, tile layout) with a straight-through gradient."""
    x_hat = quantize_tiles(x, valid, tiles, group).dequantize()
    return straight_through(x.astype(jnp.float32), x_hat)


def fake_quant_channels(x: jax.Array) -> jax.Array:
    """Dequantized V (float32, token layout [B, L, N, D]) with a straight-through gradient."""
    return straight_through(x.astype(jnp.float32), quantize_channels(x).dequantize())


def fake_quant_p(p: jax.Array, scale: float) -> jax.Array:
    """p_hat = e4m3(p * scale) / scale for p in [0, 1], straight-through gradient."""
    return straight_through(p, e4m3_round(p * scale) / scale)


def fake_quant_channels_tiles(x: jax.Array, valid: np.ndarray) -> jax.Array:
    """`fake_quant_channels` for V in tile layout [B, n_tiles, P, N, D]; padded slots are ignored.

    Gives the same scales as the token-layout version, since the valid slots are exactly the
    tokens.
    """
    xf = x.astype(jnp.float32)
    mask = jnp.asarray(valid)[None, :, :, None, None]
    amax = jnp.where(mask, finite_abs(xf), 0).max(axis=(1, 2), keepdims=True)  # [B, 1, 1, N, D]
    scales = jax.lax.stop_gradient(safe_scale(amax))
    values = to_e4m3(xf / scales)
    x_hat = QuantizedTensor(values, scales, layout="tiles:channel").dequantize()
    return straight_through(xf, x_hat)
