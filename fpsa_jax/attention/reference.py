"""The oracle: dense masked FPSA attention that materialises [B, N, L, L]. Small inputs only."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fpsa_jax.attention.config import FPSAConfig
from fpsa_jax.attention.quant import fake_quant_channels, fake_quant_p, fake_quant_tiles
from fpsa_jax.attention.tiling import from_tiles, slot_valid, tile_grid, to_tiles, token_mask


def matmul_precision(dtype) -> jax.lax.Precision:
    """HIGHEST for float32/64 inputs (no silent TF32/bf16 passes); DEFAULT for 16-bit inputs."""
    return (
        jax.lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4 else jax.lax.Precision.DEFAULT
    )


def accumulation_dtype(dtype):
    """float32, or float64 for float64 inputs (finite-difference gradient checks run in float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def quantize_qkv(q, k, v, grid, config: FPSAConfig):
    """Fake-quantizes Q, K (per tile group) and V (per channel) in token layout, float32.

    Q and K go through the tile layout because their groups are made of tiles; the result is
    mapped back to token order. All three have a straight-through gradient.
    """
    tiles = tile_grid(grid, config.tile)
    valid = slot_valid(grid, config.tile)
    q_hat = from_tiles(
        fake_quant_tiles(to_tiles(q, grid, config.tile), valid, tiles, config.q_group),
        grid,
        config.tile,
    )
    k_hat = from_tiles(
        fake_quant_tiles(to_tiles(k, grid, config.tile), valid, tiles, config.k_group),
        grid,
        config.tile,
    )
    return q_hat, k_hat, fake_quant_channels(v)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, grid, config, scale):
    """FPSA attention by definition, materialising the [B, N, L, L] scores.

    Args:
      q, k, v: [B, L, N, D], L = T * H * W in row-major (t, h, w) order.
      grid: (T, H, W).
      config: an `FPSAConfig`, or None for dense unquantized attention.
      scale: softmax scale (a float).

    Returns:
      [B, L, N, D] in q's dtype.

    Semantics: s_ij = scale * q_i . k_j over the allowed keys j (window rule, in token space; the
    reference never builds padded tiles). m_i = max_j s_ij, p_ij = exp(s_ij - m_i) and
    l_i = sum_j p_ij in float32. With FP8, Q, K, V are fake-quantized first and the numerator uses
    p_hat = e4m3(p * config.scale) / config.scale, while the denominator l_i sums the *unrounded* p
    (as FlashAttention-3-style FP8 kernels do: the row sum is accumulated in float32 before P is
    cast to FP8). o_i = sum_j p_hat_ij v_j / l_i. The P rounding uses the final row max m_i.
    """
    out_dtype = q.dtype
    prec = matmul_precision(q.dtype)
    acc = accumulation_dtype(q.dtype)
    fp8 = config is not None and config.quant == "fp8"
    if fp8:
        q, k, v = quantize_qkv(q, k, v, grid, config)
    else:
        q, k, v = (x.astype(acc) for x in (q, k, v))
    s = jnp.einsum("bqnd,bknd->bnqk", q, k, precision=prec, preferred_element_type=acc) * scale
    if config is not None and config.window is not None:
        mask = jnp.asarray(token_mask(grid, config.tile, config.window))
        s = jnp.where(mask, s, -jnp.inf)
    m = jax.lax.stop_gradient(s.max(axis=-1, keepdims=True))
    p = jnp.exp(s - m)  # masked entries: exp(-inf) = 0
    denom = p.sum(axis=-1)  # [B, N, L]
    if fp8:
        p = fake_quant_p(p, config.scale)
    o = jnp.einsum(
        "bnqk,bknd->bqnd", p.astype(v.dtype), v, precision=prec, preferred_element_type=acc
    )
    o = o / jnp.einsum("bnq->bqn", denom)[..., None]
    return o.astype(out_dtype)
