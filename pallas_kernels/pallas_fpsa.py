"""Block-sparse flash-attention forward over 3D tiles as one Pallas kernel (Triton lowering, or
interpret mode on any backend).

Arrays only: the Pallas twin of `triton_fpsa_fwd` with the same index logic (a compressed key-tile
list per query tile, a per-slot key bias for padding, scales folded into the scores and the
output) but 16-bit or float32 dots, with the FP8 rounding of P emulated by a cast. The caller
(`fpsa_jax.attention.pallas`) does the tile reorder and quantization.

Layout (H = B * N (batch, head) pairs, Pp padded tile length, Dp padded head dim, K key tiles per
query tile): q, k, v [H, n_tiles, Pp, Dp]; key_bias float32 [n_tiles, Pp] (0 real, -inf padding);
kv_tiles int32 [n_tiles, K'] whose first K columns are read (K' >= K may pad K to a power of two
for the Triton lowering); q_scales, k_scales float32 [H, n_tiles]; v_scales float32 [H, Dp].

Grid (H, n_tiles, Pp / block_q): one program per block of query rows of one query tile. It loops
(`lax.fori_loop`) over its K key tiles and, unrolled, over the Pp / block_k key blocks of each,
with an online softmax in float32:
  s = (q . k) * q_scale[u] * k_scale[v] * softmax_scale * log2(e) + key_bias
  m = running row max; p = exp2(s - m); l = alpha * l + sum(p)   (the UNROUNDED p)
  FP8: p8 = e4m3(p * p_scale), against the RUNNING max
  acc = alpha * acc + p8 . v
and writes o = acc * v_scale / (l * p_scale).

The Triton lowering needs power-of-two loaded blocks and dot dimensions >= 16: block_q, block_k
and Dp are powers of two, Pp a multiple of both.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
E4M3_MAX = 448.0


def _kernel(
    kv_ref,  # int32 [K]: key tiles of this query tile
    bias_ref,  # float32 [n_tiles, Pp]
    qs_ref,  # float32 [n_tiles]: Q scale per tile of this (batch, head)
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

    def key_block(tile, start, carry):
        acc, m_prev, l_prev = carry
        k = k_ref[tile, pl.ds(start, block_k), :]  # [block_k, Dp]
        v = v_ref[tile, pl.ds(start, block_k), :]
        bias = bias_ref[tile, pl.ds(start, block_k)]  # [block_k]
        s = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )  # [block_q, block_k]
        s = s * (q_scale * ks_ref[tile]) + bias[None, :]
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

    def key_tile(j, carry):
        tile = kv_ref[j]
        for b in range(k_blocks):  # unrolled: no integer division in the lowered loop
            carry = key_block(tile, b * block_k, carry)
        return carry

    init = (
        jnp.zeros((block_q, d_pad), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, _, row_sum = lax.fori_loop(0, kv_count, key_tile, init)
    # Every row sees at least one real key (no tile is all padding), so row_sum > 0.
    denom = row_sum if p_scale is None else row_sum * p_scale
    o_ref[...] = (acc * vs_ref[...][None, :] / denom[:, None]).astype(o_ref.dtype)


def pallas_fpsa_forward(
    kv_tiles,
    key_bias,
    q_scales,
    k_scales,
    v_scales,
    q,
    k,
    v,
    *,
    softmax_scale: float,
    p_scale: float | None,
    block_q: int,
    block_k: int,
    interpret: bool,
    out_dtype,
    kv_count: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:
    """The kernel over pre-laid-out arrays (shapes in the module docstring).

    `kv_count` is the number of real key tiles per row of kv_tiles (default: all columns).
    `p_scale` None means no P rounding (16-bit or float32 attention); float32 operands get IEEE
    float32 dots, 16-bit ones default precision.

    Returns:
      [H, n_tiles, Pp, Dp] in out_dtype; rows of padded slots hold finite values.
    """
    h, n_tiles, p_pad, d_pad = q.shape
    kv_width = kv_tiles.shape[1]
    kv_count = kv_width if kv_count is None else int(kv_count)
    precision = lax.Precision.HIGHEST if jnp.dtype(q.dtype).itemsize >= 4 else lax.Precision.DEFAULT
    kernel = functools.partial(
        _kernel,
        kv_count=kv_count,
        k_blocks=p_pad // block_k,
        block_k=block_k,
        softmax_scale=float(softmax_scale),
        p_scale=p_scale,
        precision=precision,
    )
    whole_head = pl.BlockSpec((None, n_tiles, p_pad, d_pad), lambda i, u, r: (i, 0, 0, 0))
    q_block = pl.BlockSpec((None, None, block_q, d_pad), lambda i, u, r: (i, u, r, 0))
    return pl.pallas_call(
        kernel,
        grid=(h, n_tiles, p_pad // block_q),
        in_specs=[
            pl.BlockSpec((None, kv_width), lambda i, u, r: (u, 0)),
            pl.BlockSpec((n_tiles, p_pad), lambda i, u, r: (0, 0)),
            pl.BlockSpec((None, n_tiles), lambda i, u, r: (i, 0)),
            pl.BlockSpec((None, n_tiles), lambda i, u, r: (i, 0)),
            pl.BlockSpec((None, d_pad), lambda i, u, r: (i, 0)),
            q_block,
            whole_head,
            whole_head,
        ],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, out_dtype),
        compiler_params=plgpu.CompilerParams(
            num_warps=num_warps or (4 if d_pad <= 64 else 8), num_stages=num_stages or 2
        ),
        interpret=interpret,
        name="fpsa_forward",
    )(kv_tiles, key_bias, q_scales, k_scales, v_scales, q, k, v)
