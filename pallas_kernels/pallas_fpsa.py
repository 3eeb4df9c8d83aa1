"""FPSA block-sparse attention forward as one Pallas kernel (Triton lowering on GPU, or interpret).

The Pallas twin of the FP8 Triton kernel: the same tile-major layout, the same int32 mask tables
(`MaskInfo.kv_tiles`, the slot-valid table) read inside the kernel, the same place for every scale,
but bf16 (or float32) dots with FP8 rounding emulated by casts. It runs on CPU with
`interpret=True`, which is how CI checks the kernel's index logic.

Data flow (shapes: B batch, L tokens, N heads, D head dim, P slots per tile, Pp = P padded,
Dp = D padded, K = kv_count key tiles per query tile):

1. Pre-pass (XLA, outside the kernel): `to_tiles` -> [B, n_tiles, P, N, D]; padded slots zeroed;
   with FP8, Q and K quantized per tile group and V per channel with the operator's own helpers
   (`quantize_tiles`, `quantize_channels`). The kernel gets the E4M3 *values* (exact in bf16 and
   float32) and the float32 scales separately, as the real FP8 kernel will.
2. Kernel, grid (B * N, n_tiles, Pp // block_q): one program per block of `block_q` query rows of
   one query tile of one (batch, head). It loops (`lax.fori_loop`) over its K key tiles, read from
   the `kv_tiles` row, in blocks of `block_k` slots, with an online softmax in float32:
     s = (q_vals . k_vals) * q_scale[tile_q] * k_scale[tile_k] * softmax_scale * log2(e)
     s = -inf where the key slot is padding (slot-valid table)
     m = running row max; p = exp2(s - m); l = alpha * l + sum(p)   (the UNROUNDED p)
     FP8: p8 = e4m3(p * p_scale) (a cast to float8_e4m3fn, against the RUNNING max)
     acc = alpha * acc + p8 . v_vals   (p8 holds integers-and-fractions exact in bf16)
   and writes o = acc * v_scale / (l * p_scale) (p_scale = 1, v_scale = 1 without FP8).
3. Post-pass: drop padded slots and channels, `from_tiles`.

Padding for the Triton lowering (every loaded block must have a power-of-two size, and Triton's
dot wants each dimension >= 16):
  - D is padded with zeros to Dp = next power of two >= max(D, 16); zero channels change no dot
    product and are sliced off.
  - P is padded to Pp, a multiple of max(block_q, block_k); block_q and block_k are powers of two.
    The default block (`default_block`) is the largest of 16, 32, 64, 128 that pads P to within
    1.25x of the least padding, e.g. P = 192 (the (3, 8, 8) tile) -> 64 and Pp = 192 (no waste;
    128 would pad to 256), P = 100 -> 128, P = 27 -> 32.
    Padded slots are invalid keys (slot-valid table) and their query rows are dropped.
The rounding of P against the running rather than the final row max is the one permitted
difference from `reference_attention` (DESIGN.md section 3).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fpsa_jax.attention.config import E4M3_MAX, FPSAConfig, validate_grid
from fpsa_jax.attention.mask import MaskInfo, build_mask_info
from fpsa_jax.attention.quant import quantize_channels, quantize_tiles
from fpsa_jax.attention.tiling import from_tiles, slot_valid, to_tiles

LOG2E = math.log2(math.e)
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


def _fpsa_kernel(
    kv_ref,  # int32 [K]: key tiles of this query tile
    valid_ref,  # int32 [n_tiles, Pp]: 1 where a slot holds a real token
    qs_ref,  # float32 [n_tiles]: Q scale per tile (this batch, head)
    ks_ref,  # float32 [n_tiles]: K scale per tile
    vs_ref,  # float32 [Dp]: V scale per channel
    q_ref,  # [block_q, Dp]
    k_ref,  # [n_tiles, Pp, Dp]
    v_ref,  # [n_tiles, Pp, Dp]
    o_ref,  # [block_q, Dp]
    *,
    kv_count: int,
    k_blocks: int,
    block_k: int,
    softmax_scale: float,
    p_scale: float | None,
    precision,
):
    q = q_ref[...]
    block_q, d_pad = q.shape
    # Scores go to base 2 (exp(x) = exp2(x * log2 e)); the Q scale and softmax scale fold in here.
    q_scale = qs_ref[pl.program_id(1)] * (softmax_scale * LOG2E)

    def body(j, carry):
        acc, m_prev, l_prev = carry
        if k_blocks == 1:
            tile, start = kv_ref[j], 0
        else:
            tile = kv_ref[j // k_blocks]
            start = pl.multiple_of((j % k_blocks) * block_k, block_k)
        k = k_ref[tile, pl.ds(start, block_k), :]  # [block_k, Dp]
        v = v_ref[tile, pl.ds(start, block_k), :]
        key_ok = valid_ref[tile, pl.ds(start, block_k)] != 0  # [block_k]

        s = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )  # [block_q, block_k]
        s = jnp.where(key_ok[None, :], s * (q_scale * ks_ref[tile]), -jnp.inf)
        m_new = jnp.maximum(m_prev, s.max(axis=1))
        # A block of padding only, before any real key: keep everything at zero instead of NaN.
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m_prev - m_use)
        p = jnp.exp2(s - m_use[:, None])  # in [0, 1]
        l_new = alpha * l_prev + p.sum(axis=1)  # the denominator sums the unrounded p
        if p_scale is not None:
            # E4M3 rounding of P against the running max; p * p_scale <= 448 (p <= 1), the
            # minimum only guards float round-off. The cast back to bf16/float32 is exact.
            p = jnp.minimum(p * p_scale, E4M3_MAX).astype(jnp.float8_e4m3fn)
        pv = lax.dot_general(
            p.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        return alpha[:, None] * acc + pv, m_new, l_new

    init = (
        jnp.zeros((block_q, d_pad), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, _, row_sum = lax.fori_loop(0, kv_count * k_blocks, body, init)
    # Every row sees at least one real key (no tile is all padding), so row_sum > 0.
    denom = row_sum if p_scale is None else row_sum * p_scale
    o_ref[...] = (acc * vs_ref[...][None, :] / denom[:, None]).astype(o_ref.dtype)


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
      [B, n_tiles, P, N, D] in qt's dtype; rows of padded slots hold finite garbage.
    """
    b, n_tiles, p_slots, n_heads, d = qt.shape
    out_dtype = qt.dtype
    bq = _check_block("block_q", block_q or default_block(p_slots))
    bk = _check_block("block_k", block_k or default_block(p_slots))
    p_pad, d_pad = _round_up(p_slots, max(bq, bk)), _next_pow2(max(d, 16))
    # 16-bit inputs: bf16 dots (E4M3 values are exact in bf16). float32: IEEE float32 dots.
    if jnp.dtype(qt.dtype).itemsize >= 4:
        compute, precision = jnp.float32, lax.Precision.HIGHEST
    else:
        compute, precision = jnp.bfloat16, lax.Precision.DEFAULT

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

    valid = np.zeros((n_tiles, p_pad), np.int32)
    valid[:, :p_slots] = host_valid
    kv_count = info.kv_count
    kernel = functools.partial(
        _fpsa_kernel,
        kv_count=kv_count,
        k_blocks=p_pad // bk,
        block_k=bk,
        softmax_scale=float(scale),
        p_scale=p_scale,
        precision=precision,
    )
    whole_head = pl.BlockSpec((None, n_tiles, p_pad, d_pad), lambda h, u, r: (h, 0, 0, 0))
    q_block = pl.BlockSpec((None, None, bq, d_pad), lambda h, u, r: (h, u, r, 0))
    out = pl.pallas_call(
        kernel,
        grid=(b * n_heads, n_tiles, p_pad // bq),
        in_specs=[
            pl.BlockSpec((None, kv_count), lambda h, u, r: (u, 0)),
            pl.BlockSpec((n_tiles, p_pad), lambda h, u, r: (0, 0)),
            pl.BlockSpec((None, n_tiles), lambda h, u, r: (h, 0)),
            pl.BlockSpec((None, n_tiles), lambda h, u, r: (h, 0)),
            pl.BlockSpec((None, d_pad), lambda h, u, r: (h, 0)),
            q_block,
            whole_head,
            whole_head,
        ],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct((b * n_heads, n_tiles, p_pad, d_pad), out_dtype),
        compiler_params=plgpu.CompilerParams(
            num_warps=num_warps or (4 if d_pad <= 64 else 8), num_stages=num_stages or 2
        ),
        interpret=interpret,
        name="fpsa_forward",
    )(jnp.asarray(info.kv_tiles), jnp.asarray(valid), q_scales, k_scales, v_scales, qk, kk, vk)
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
