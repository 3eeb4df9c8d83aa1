"""impl="pallas": FPSA attention through the Pallas kernel (Triton lowering on GPU, or interpret).

The Pallas twin of impl="triton": the same tile-major layout, mask tables (`MaskInfo.kv_tiles`,
the per-slot key bias of `kernel_layout.key_bias`) and place of every scale, but 16-bit or float32
dots with the FP8 rounding emulated by casts (`pallas_kernels.pallas_fpsa`). It runs on CPU with
`interpret=True`, which is how CI checks the kernel's index logic. Forward only.

Data flow (B batch, L tokens, N heads, D head dim, P slots per tile, Pp = P padded, Dp = D padded):
1. Pre-pass (XLA): `to_tiles` -> [B, n_tiles, P, N, D]; padded slots zeroed; with FP8, Q and K
   quantized per tile group and V per channel with the operator's own helpers. The kernel gets the
   E4M3 *values* (exact in bf16 and float32) and the float32 scales separately, as the FP8 kernel.
2. Kernel (see `pallas_kernels.pallas_fpsa`).
3. Post-pass: drop padded slots and channels, `from_tiles`.

Padding for the Triton lowering (power-of-two blocks, dot dimensions >= 16): D is padded with zeros
to Dp = next power of two >= max(D, 16) (zero channels change no dot product); P is padded to Pp,
a multiple of max(block_q, block_k), powers of two. The default block (`default_block`) is the
largest of 16, 32, 64, 128 that pads P to within 1.25x of the least padding, e.g. P = 192 (the
(3, 8, 8) tile) -> 64 and Pp = 192 (no waste; 128 would pad to 256), P = 100 -> 128, P = 27 -> 32.
The key-tile table is padded to a power-of-two width. The rounding of P against the running rather
than the final row max is the one permitted difference from `reference_attention` (DESIGN.md 3).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax.attention.config import FPSAConfig, validate_grid
from fpsa_jax.attention.kernel_layout import key_bias
from fpsa_jax.attention.mask import MaskInfo, build_mask_info
from fpsa_jax.attention.quant import quantize_channels, quantize_tiles
from fpsa_jax.attention.tiling import from_tiles, slot_valid, to_tiles
from pallas_kernels.pallas_fpsa import pallas_fpsa_forward

# Tile of the one-axis token grid (1, 1, L) used for dense attention (config=None).
DENSE_TILE = 128
_BLOCK_CHOICES = (16, 32, 64, 128)


def _next_pow2(x: int) -> int:
    return 1 << (max(int(x), 1) - 1).bit_length()


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def default_block(p_slots: int) -> int:
    """The largest block of 16, 32, 64, 128 slots that pads a tile of P slots to at most 1.25x
    the least padded size (that of 16): larger blocks feed the tensor cores better, padded slots
    are wasted work. P = 192 -> 64 (no padding), 100 -> 128, 27 -> 32, 3 -> 16."""
    least = _round_up(p_slots, _BLOCK_CHOICES[0])
    return max(b for b in _BLOCK_CHOICES if 4 * _round_up(p_slots, b) <= 5 * least)


def _check_block(name: str, b: int) -> int:
    b = int(b)
    if b < 1 or b & (b - 1):
        raise ValueError(f"{name} must be a power of two (the Triton lowering needs it), got {b}")
    return b


def _to_kernel_layout(x: jax.Array, p_pad: int, d_pad: int) -> jax.Array:
    """[B, n_tiles, P, N, D] -> [B * N, n_tiles, Pp, Dp], zero padded."""
    b, n_tiles, p, n_heads, d = x.shape
    x = jnp.einsum("bupnd->bnupd", x)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, p_pad - p), (0, d_pad - d)))
    return x.reshape(b * n_heads, n_tiles, p_pad, d_pad)


def _per_tile_scales(scales: jax.Array) -> jax.Array:
    """[B, n_tiles, 1, N, 1] -> [B * N, n_tiles]."""
    b, n_tiles, _, n_heads, _ = scales.shape
    return jnp.einsum("bun->bnu", scales[:, :, 0, :, 0]).reshape(b * n_heads, n_tiles)


def _padded_kv_table(kv_tiles: np.ndarray) -> np.ndarray:
    """int32 [n_tiles, K] -> [n_tiles, K'] with K' the next power of two (repeating the last
    column, never read)."""
    width = _next_pow2(kv_tiles.shape[1])
    return np.pad(kv_tiles, ((0, 0), (0, width - kv_tiles.shape[1])), mode="edge")


def pallas_tiled_attention(
    qt,
    kt,
    vt,
    *,
    info: MaskInfo,
    config: FPSAConfig,
    scale: float,
    interpret: bool,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:
    """FPSA attention on tile-major inputs through the Pallas kernel.

    Args:
      qt, kt, vt: [B, n_tiles, P, N, D] from `to_tiles`. Padded slots may hold anything finite or
        not: they are zeroed before quantization and never read as keys.
      info: the mask description of (grid, config.tile, config.window).
      config: the operator (tile, window, quant, groups, P scale).
      scale: softmax scale.
      interpret: run the kernel in the Pallas interpreter (any backend) instead of Triton.
      block_q, block_k: query rows per program and key slots per loop step, powers of two; None
        picks `default_block(P)`.
      num_warps, num_stages: Triton launch parameters (ignored when interpreting).

    Returns:
      [B, n_tiles, P, N, D] in qt's dtype; rows of padded slots hold finite values.
    """
    b, n_tiles, p_slots, n_heads, d = qt.shape
    out_dtype = qt.dtype
    bq = _check_block("block_q", block_q or default_block(p_slots))
    bk = _check_block("block_k", block_k or default_block(p_slots))
    p_pad, d_pad = _round_up(p_slots, max(bq, bk)), _next_pow2(max(d, 16))
    # 16-bit inputs: 16-bit dots (E4M3 values are exact in bf16). float32: float32 dots.
    compute = jnp.float32 if jnp.dtype(qt.dtype).itemsize >= 4 else jnp.bfloat16

    host_valid = slot_valid(info.grid, info.tile)  # bool [n_tiles, P]
    mask = jnp.asarray(host_valid)[None, :, :, None, None]
    qt, kt, vt = (jnp.where(mask, x, 0) for x in (qt, kt, vt))
    if config.quant == "fp8":
        qq = quantize_tiles(qt, host_valid, info.tiles, config.q_group)
        kq = quantize_tiles(kt, host_valid, info.tiles, config.k_group)
        # Padded slots are zero, so the per-channel absmax over all slots is the one over tokens.
        vq = quantize_channels(vt.reshape(b, n_tiles * p_slots, n_heads, d))
        qt, kt = qq.values, kq.values
        vt = vq.values.reshape(b, n_tiles, p_slots, n_heads, d)
        q_scales, k_scales = _per_tile_scales(qq.scales), _per_tile_scales(kq.scales)
        v_scales = vq.scales[:, 0].reshape(b * n_heads, d)  # [B, 1, N, D] -> [B * N, D]
        p_scale = config.scale
    else:
        q_scales = k_scales = jnp.ones((b * n_heads, n_tiles), jnp.float32)
        v_scales = jnp.ones((b * n_heads, d), jnp.float32)
        p_scale = None
    v_scales = jnp.pad(v_scales, ((0, 0), (0, d_pad - d)), constant_values=1.0)
    qk, kk, vk = (_to_kernel_layout(x.astype(compute), p_pad, d_pad) for x in (qt, kt, vt))

    out = pallas_fpsa_forward(
        jnp.asarray(_padded_kv_table(info.kv_tiles)),
        jnp.asarray(key_bias(info.grid, info.tile, p_pad).reshape(n_tiles, p_pad)),
        q_scales,
        k_scales,
        v_scales,
        qk,
        kk,
        vk,
        softmax_scale=scale,
        p_scale=p_scale,
        block_q=bq,
        block_k=bk,
        interpret=interpret,
        out_dtype=out_dtype,
        kv_count=info.kv_count,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    out = out.reshape(b, n_heads, n_tiles, p_pad, d_pad)[:, :, :, :p_slots, :d]
    return jnp.einsum("bnupd->bupnd", out)


def pallas_attention(
    q,
    k,
    v,
    *,
    grid,
    config: FPSAConfig | None,
    scale: float,
    interpret: bool | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:
    """FPSA attention (DESIGN.md section 3) through the Pallas kernel.

    Args:
      q, k, v: [B, L, N, D] with L = T * H * W tokens in row-major (t, h, w) order.
      grid: (T, H, W).
      config: an `FPSAConfig`, or None for dense unquantized attention (still through the
        kernel, on the one-axis grid (1, 1, L) in tiles of up to DENSE_TILE tokens).
      scale: softmax scale.
      interpret: run in the Pallas interpreter; None means wherever the default backend is not
        a GPU.
      block_q, block_k, num_warps, num_stages: see `pallas_tiled_attention`.

    Returns:
      [B, L, N, D] in q's dtype.
    """
    g = validate_grid(grid)
    if config is None:
        g = (1, 1, math.prod(g))
        config = FPSAConfig(tile=(1, 1, min(DENSE_TILE, g[2])))
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return _pallas_attention(
        q,
        k,
        v,
        grid=g,
        config=config,
        scale=float(scale),
        interpret=bool(interpret),
        block_q=block_q,
        block_k=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "grid",
        "config",
        "scale",
        "interpret",
        "block_q",
        "block_k",
        "num_warps",
        "num_stages",
    ),
)
def _pallas_attention(q, k, v, *, grid, config, scale, interpret, **kernel_args):
    info = build_mask_info(grid, config.tile, config.window)
    qt, kt, vt = (to_tiles(x, grid, config.tile) for x in (q, k, v))
    out = pallas_tiled_attention(
        qt, kt, vt, info=info, config=config, scale=scale, interpret=interpret, **kernel_args
    )
    return from_tiles(out, grid, config.tile).astype(q.dtype)
