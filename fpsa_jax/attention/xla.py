"""The portable path: each query tile gathers its key tiles and runs dense attention on them.

Memory is O(L * window): query tiles are processed in chunks (`lax.map`), each chunk materialising
only its [C, N, P, kv_count * P] scores, and the chunk body is rematerialised in the backward pass
(`jax.checkpoint`) so the scan keeps no scores as residuals. Differentiable; FP8 quantization uses
the straight-through estimator. Shapes: B batch, L tokens, N heads, D head dim, P tokens per tile,
C query tiles per chunk, K key tiles per query tile.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fpsa_jax.attention.config import FPSAConfig
from fpsa_jax.attention.mask import MaskInfo, build_mask_info
from fpsa_jax.attention.quant import fake_quant_channels_tiles, fake_quant_p, fake_quant_tiles
from fpsa_jax.attention.reference import accumulation_dtype, matmul_precision
from fpsa_jax.attention.tiling import from_tiles, slot_valid, to_tiles

# Float32 score elements one chunk may hold; ~4 live copies (s, p, p_hat, grads) fit in ~1 GiB.
SCORE_ELEMENTS_PER_CHUNK = 1 << 26


def _num_chunks(total: int, per_item: int, chunk: int | None) -> tuple[int, int]:
    """(items per chunk, number of chunks) for `total` items of `per_item` score elements."""
    if chunk is None:
        chunk = max(1, min(total, SCORE_ELEMENTS_PER_CHUNK // max(per_item, 1)))
    chunk = max(1, min(chunk, total))
    return chunk, math.ceil(total / chunk)


def dense_attention(q, k, v, *, scale, chunk: int | None = None) -> jax.Array:
    """Plain softmax attention, queries in chunks so the scores stay O(chunk * L).

    Args:
      q, k, v: [B, L, N, D].
      scale: softmax scale.
      chunk: queries per chunk; None picks one from SCORE_ELEMENTS_PER_CHUNK.

    Returns:
      [B, L, N, D] in q's dtype. Each row is computed exactly as unchunked attention would
      (float32 softmax and accumulation; HIGHEST precision dots for float32 inputs).
    """
    b, length, n_heads, d = q.shape
    prec, acc = matmul_precision(q.dtype), accumulation_dtype(q.dtype)

    def rows(q_c):  # [B, C, N, D] -> [B, C, N, D]
        s = jnp.einsum("bqnd,bknd->bnqk", q_c, k, precision=prec, preferred_element_type=acc)
        p = jax.nn.softmax(s * scale, axis=-1)
        o = jnp.einsum(
            "bnqk,bknd->bqnd", p.astype(v.dtype), v, precision=prec, preferred_element_type=acc
        )
        return o.astype(q.dtype)

    c, n_chunks = _num_chunks(length, b * n_heads * length, chunk)
    if n_chunks == 1:
        return rows(q)
    qp = jnp.pad(q, ((0, 0), (0, c * n_chunks - length), (0, 0), (0, 0)))
    qp = jnp.moveaxis(qp.reshape(b, n_chunks, c, n_heads, d), 1, 0)
    o = jax.lax.map(jax.checkpoint(rows), qp)  # [n_chunks, B, C, N, D]
    return jnp.moveaxis(o, 0, 1).reshape(b, n_chunks * c, n_heads, d)[:, :length]


def tiled_attention(
    qt, kt, vt, *, info: MaskInfo, config: FPSAConfig, scale, chunk_tiles: int | None = None
) -> jax.Array:
    """FPSA attention on tile-major inputs.

    Args:
      qt, kt, vt: [B, n_tiles, P, N, D] from `to_tiles`. Padded slots may hold anything: they are
        excluded from the quantization scales, masked as keys, and their outputs are garbage that
        `from_tiles` drops.
      info: the mask description of (grid, config.tile, config.window).
      config: the operator.
      scale: softmax scale.
      chunk_tiles: query tiles per chunk; None picks one from SCORE_ELEMENTS_PER_CHUNK.

    Returns:
      [B, n_tiles, P, N, D] float32 (float64 for float64 inputs).
    """
    b, n_tiles, p_slots, n_heads, d = qt.shape
    prec, acc = matmul_precision(qt.dtype), accumulation_dtype(qt.dtype)
    valid = jnp.asarray(slot_valid(info.grid, info.tile))  # [n_tiles, P]
    if config.quant == "fp8":
        host_valid = slot_valid(info.grid, info.tile)
        qt = fake_quant_tiles(qt, host_valid, info.tiles, config.q_group)
        kt = fake_quant_tiles(kt, host_valid, info.tiles, config.k_group)
        vt = fake_quant_channels_tiles(vt, host_valid)
    qt, kt, vt = (x.astype(acc) for x in (qt, kt, vt))
    # Zero padded keys and values: finite garbage there then never reaches a valid output.
    slot_mask = valid[None, :, :, None, None]
    kt, vt = jnp.where(slot_mask, kt, 0), jnp.where(slot_mask, vt, 0)

    n_kv = info.kv_count
    c, n_chunks = _num_chunks(n_tiles, b * n_heads * p_slots * n_kv * p_slots, chunk_tiles)
    pad = c * n_chunks - n_tiles
    # Dummy query tiles at the end reuse tile 0's key list; their outputs are sliced off.
    kv_idx = jnp.asarray(info.kv_tiles)
    kv_idx = jnp.concatenate([kv_idx, jnp.broadcast_to(kv_idx[:1], (pad, n_kv))])
    qp = jnp.pad(qt, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    q_chunks = jnp.moveaxis(qp.reshape(b, n_chunks, c, p_slots, n_heads, d), 1, 0)
    idx_chunks = kv_idx.reshape(n_chunks, c, n_kv)

    def chunk_body(args):
        q_c, idx = args  # [B, C, P, N, D], [C, K]
        k_g = kt[:, idx].reshape(b, c, n_kv * p_slots, n_heads, d)
        v_g = vt[:, idx].reshape(b, c, n_kv * p_slots, n_heads, d)
        key_ok = valid[idx].reshape(c, n_kv * p_slots)[None, :, None, None, :]
        s = (
            jnp.einsum("bcqnd,bcknd->bcnqk", q_c, k_g, precision=prec, preferred_element_type=acc)
            * scale
        )
        s = jnp.where(key_ok, s, -jnp.inf)
        m = jax.lax.stop_gradient(s.max(axis=-1, keepdims=True))
        p = jnp.exp(s - m)
        denom = p.sum(axis=-1)  # unrounded p, as in the reference (see its docstring)
        if config.quant == "fp8":
            p = fake_quant_p(p, config.scale)
        o = jnp.einsum("bcnqk,bcknd->bcqnd", p, v_g, precision=prec, preferred_element_type=acc)
        return o / jnp.einsum("bcnq->bcqn", denom)[..., None]

    if n_chunks == 1:
        out = chunk_body((q_chunks[0], idx_chunks[0]))[:, None]
    else:
        out = jnp.moveaxis(jax.lax.map(jax.checkpoint(chunk_body), (q_chunks, idx_chunks)), 0, 1)
    return out.reshape(b, n_chunks * c, p_slots, n_heads, d)[:, :n_tiles]


def xla_attention(q, k, v, *, grid, config: FPSAConfig | None, scale) -> jax.Array:
    """FPSA attention through XLA. q, k, v: [B, L, N, D] -> [B, L, N, D] in q's dtype."""
    if config is None or (config.window is None and config.quant == "none"):
        # Dense and unquantized: the tile does not matter, skip the reorder and padding.
        return dense_attention(q, k, v, scale=scale)
    info = build_mask_info(grid, config.tile, config.window)
    qt, kt, vt = (to_tiles(x, grid, config.tile) for x in (q, k, v))
    out = tiled_attention(qt, kt, vt, info=info, config=config, scale=scale)
    return from_tiles(out, grid, config.tile).astype(q.dtype)
