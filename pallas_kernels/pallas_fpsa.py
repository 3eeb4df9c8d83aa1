"""Block-sparse flash-attention forward over 3D tiles as one Pallas kernel (Triton lowering, or
interpret mode on any backend): the twin of `triton_fpsa_fwd` that CI runs on CPU.

Arrays only, and exactly the Triton forward's operands, tables and argument order
(`fpsa_jax.attention.kernel_layout` builds them): Q, K [B, N, Lp, D] and V^T [B, N, D, Lp] (E4M3
values, or 16-/32-bit ones for quant "none"; valid slots first in each tile), q_scale, k_scale
float32 [B, N, n_tiles], v_scale float32 [B, N, D], key_bias float32 [Lp] (0 real slot, -inf
padding), the key-block table key_blocks int32 [n_tiles, M] with block_count int32 [n_tiles]
(`kernel_layout.key_block_list` at block_k: per query tile, the key blocks holding a real token),
and optionally the slot table slot_token int32 [Lp] (-1 padding) that sends each output row
straight to its token. The dots run in bf16 (float32 for float32 values) with float32
accumulation: E4M3 values and their products are exact there, so only P's E4M3 rounding, done by a
cast, is FP8 arithmetic.

Grid (B * N, n_tiles, Pp / block_q): one program per block of query rows of one query tile. It
loops (`lax.fori_loop`, dynamic trip count) over exactly the tile's listed key blocks, as the
Triton kernel does, with its online softmax in base 2:
  s2 = (q . k) * q_scale[u] * k_scale[v] * softmax_scale * log2(e) + key_bias
  m = running row max (from a finite -1e30); p' = exp2(s2 - m) * p_scale; l' += sum(p') unrounded
  acc = alpha * acc + e4m3(p') . v   (P rounded against the RUNNING max)
and writes o = acc * v_scale / l' and lse2 = m + log2(l' / p_scale). A query block that is all
padding (its first slot's key bias is -inf) runs no key block and writes o = 0, lse2 = 0.

The Triton lowering needs power-of-two blocks and dot dimensions >= 16: block_q, block_k and D
powers of two (D >= 16), Pp a multiple of both. Interpret mode takes any D.
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

LOG2E = math.log2(math.e)
E4M3_MAX = 448.0


def _kernel(
    blocks_ref,  # int32 [M]: key blocks of this query tile that hold a real token
    count_ref,  # int32 [n_tiles]: real entries of each query tile's row of blocks
    bias_ref,  # float32 [Lp]
    qs_ref,  # float32 [n_tiles]: Q scale per tile of this (batch, head)
    ks_ref,  # float32 [n_tiles]: K scale per tile
    vs_ref,  # float32 [D]: V scale per channel
    token_ref,  # int32 [block_q]: token of each query row (-1 padding), or None
    q_ref,  # [block_q, D]
    k_ref,  # [Lp, D]
    vt_ref,  # [D, Lp]
    o_ref,  # [block_q, D], or [L, N, D] of this batch when token_ref is given
    lse_ref,  # float32 [block_q]
    *,
    padded_tile: int,
    heads: int,
    block_k: int,
    k_blocks: int,
    softmax_scale: float,
    p_scale: float,
    round_p: bool,
    compute_dtype,
    precision,
):
    q = q_ref[...].astype(compute_dtype)
    block_q = q.shape[0]
    # Scores go to base 2 (exp(x) = exp2(x * log2 e)); the Q scale and softmax scale fold in here.
    q_scale = qs_ref[pl.program_id(1)] * (softmax_scale * LOG2E)

    def key_block(col, scale, carry):
        acc, m_prev, l_prev = carry
        k = k_ref[pl.ds(col, block_k), :].astype(compute_dtype)  # [block_k, D]
        vt = vt_ref[:, pl.ds(col, block_k)].astype(compute_dtype)  # [D, block_k]
        s = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )  # [block_q, block_k]
        s = s * scale + bias_ref[pl.ds(col, block_k)][None, :]
        m_new = jnp.maximum(m_prev, s.max(axis=1))
        alpha = jnp.exp2(m_prev - m_new)
        p = jnp.exp2(s - m_new[:, None]) * p_scale  # in [0, p_scale]
        l_new = alpha * l_prev + p.sum(axis=1)  # the denominator sums the unrounded p
        if round_p:
            # The minimum only guards float round-off above 448; the cast back is exact.
            p = jnp.minimum(p, E4M3_MAX).astype(jnp.float8_e4m3fn)
        pv = lax.dot_general(
            p.astype(compute_dtype),
            vt,
            (((1,), (1,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        return alpha[:, None] * acc + pv, m_new, l_new

    def listed_block(j, carry):
        block = blocks_ref[j]
        return key_block(block * block_k, q_scale * ks_ref[block // k_blocks], carry)

    init = (
        jnp.zeros((block_q, q.shape[1]), jnp.float32),
        jnp.full((block_q,), -1e30, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    # Valid-first slots: a query block whose first slot is padding is all padding: no key block.
    u = pl.program_id(1)
    live = bias_ref[u * padded_tile + pl.program_id(2) * block_q] == 0
    count = jnp.where(live, count_ref[u], 0)
    acc, m, l_sum = lax.fori_loop(0, count, listed_block, init)
    # Rows of a live block see a real key (their own tile's), so l_sum >= 1 there; a skipped
    # block has acc = 0, l_sum = 0 and writes o = 0, lse2 = 0.
    written = l_sum > 0
    l_sum = jnp.where(written, l_sum, 1.0)
    out = (acc * vs_ref[...][None, :] / l_sum[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(written, m + jnp.log2(l_sum) - math.log2(p_scale), 0.0)
    if token_ref is None:
        o_ref[...] = out
    else:
        token = token_ref[...]
        head = pl.program_id(0) % heads
        # Padded rows point past the end: masked on the GPU, dropped by the interpreter's scatter
        # (a repeated in-range index would race with the real row written there).
        rows = jnp.where(token >= 0, token, o_ref.shape[0])
        channels = jnp.arange(out.shape[1], dtype=jnp.int32)[None, :]
        mask = jnp.broadcast_to((token >= 0)[:, None], out.shape)
        plgpu.store(o_ref.at[rows[:, None], head, channels], out, mask=mask)


def fpsa_forward(
    q,
    k,
    v_t,
    q_scale,
    k_scale,
    v_scale,
    key_bias,
    key_blocks: np.ndarray,
    block_count: np.ndarray,
    *,
    padded_tile: int,
    scale: float,
    p_scale: float,
    out_dtype,
    block_q: int,
    block_k: int,
    interpret: bool,
    slot_token: np.ndarray | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
):
    """The kernel over the shared operands (module docstring), Triton's argument order.

    `key_blocks` (host int32 [n_tiles, M]) and `block_count` (host int32 [n_tiles]) list the key
    blocks of block_k slots each query tile reads. `p_scale` 1 means no P rounding (16-bit or
    float32 attention); other values round P to E4M3 at that static scale. `slot_token` (host
    int32 [Lp]) selects the token-order output.

    Returns:
      (o, lse2 float32 [B, N, Lp]): o [B, N, Lp, D] in out_dtype (padded rows finite; zero, with
      lse2 0, in all-padding query blocks), or [B, L, N, D] in token order when `slot_token` is
      given.
    """
    b, n, lp, d = q.shape
    if k.shape != q.shape or v_t.shape != (b, n, d, lp):
        raise ValueError(f"q, k [B, N, Lp, D] and v_t [B, N, D, Lp], got {q.shape}, {v_t.shape}")
    if padded_tile % block_q or padded_tile % block_k or lp % padded_tile:
        raise ValueError(
            f"Pp = {padded_tile} must be a multiple of block_q = {block_q} and block_k = "
            f"{block_k}, and Lp = {lp} a multiple of Pp"
        )
    if not interpret and (d < 16 or d & (d - 1)):
        raise ValueError(f"the Triton lowering needs a power-of-two head dim >= 16, got {d}")
    n_tiles = lp // padded_tile
    if np.ndim(key_blocks) != 2 or np.shape(key_blocks)[0] != n_tiles:
        raise ValueError(f"key_blocks must be [n_tiles={n_tiles}, M], got {np.shape(key_blocks)}")
    if np.shape(block_count) != (n_tiles,):
        raise ValueError(f"block_count must be [n_tiles={n_tiles}], got {np.shape(block_count)}")
    compute = jnp.float32 if jnp.dtype(q.dtype).itemsize >= 4 else jnp.bfloat16
    kernel = functools.partial(
        _kernel,
        padded_tile=padded_tile,
        heads=n,
        block_k=block_k,
        k_blocks=padded_tile // block_k,
        softmax_scale=float(scale),
        p_scale=float(p_scale),
        round_p=float(p_scale) != 1.0,
        compute_dtype=compute,
        precision=lax.Precision.HIGHEST if compute == jnp.float32 else lax.Precision.DEFAULT,
    )
    q_blocks = padded_tile // block_q
    row_block = lambda i, u, r: (i // n, i % n, u * q_blocks + r, 0)
    head_map = lambda i, u, r: (i // n, i % n, 0, 0)
    in_specs = [
        pl.BlockSpec((None, np.shape(key_blocks)[1]), lambda i, u, r: (u, 0)),
        pl.BlockSpec((n_tiles,), lambda i, u, r: (0,)),
        pl.BlockSpec((lp,), lambda i, u, r: (0,)),
        pl.BlockSpec((None, None, n_tiles), lambda i, u, r: (i // n, i % n, 0)),
        pl.BlockSpec((None, None, n_tiles), lambda i, u, r: (i // n, i % n, 0)),
        pl.BlockSpec((None, None, d), lambda i, u, r: (i // n, i % n, 0)),
    ]
    args = [jnp.asarray(np.ascontiguousarray(x, np.int32)) for x in (key_blocks, block_count)]
    args.append(key_bias)
    args += [q_scale, k_scale, v_scale]
    if slot_token is None:
        o_spec = pl.BlockSpec((None, None, block_q, d), row_block)
        o_shape = (b, n, lp, d)
    else:
        if np.shape(slot_token) != (lp,):
            raise ValueError(f"slot_token must be [Lp] = [{lp}], got {np.shape(slot_token)}")
        tokens = int(np.count_nonzero(np.asarray(slot_token) >= 0))
        in_specs.append(pl.BlockSpec((block_q,), lambda i, u, r: (u * q_blocks + r,)))
        args.append(jnp.asarray(np.ascontiguousarray(slot_token, np.int32)))
        o_spec = pl.BlockSpec((None, tokens, n, d), lambda i, u, r: (i // n, 0, 0, 0))
        o_shape = (b, tokens, n, d)
    in_specs += [
        pl.BlockSpec((None, None, block_q, d), row_block),
        pl.BlockSpec((None, None, lp, d), head_map),
        pl.BlockSpec((None, None, d, lp), head_map),
    ]
    with_tokens = slot_token is not None

    def body(blocks, count, bias, qs, ks, vs, *rest):
        token, rest = (rest[0], rest[1:]) if with_tokens else (None, rest)
        kernel(blocks, count, bias, qs, ks, vs, token, *rest)

    return pl.pallas_call(
        body,
        grid=(b * n, n_tiles, q_blocks),
        in_specs=in_specs,
        out_specs=(
            o_spec,
            pl.BlockSpec((None, None, block_q), lambda i, u, r: (i // n, i % n, u * q_blocks + r)),
        ),
        out_shape=(
            jax.ShapeDtypeStruct(o_shape, out_dtype),
            jax.ShapeDtypeStruct((b, n, lp), jnp.float32),
        ),
        compiler_params=plgpu.CompilerParams(
            num_warps=num_warps or (4 if d <= 64 else 8), num_stages=num_stages or 2
        ),
        interpret=interpret,
        name="fpsa_forward",
    )(*args, q, k, v_t)
