"""Block-sparse flash-attention forward over 3D tiles, FP8 (E4M3) or 16-bit: a Triton kernel.

Arrays only: this module knows the kernel layout and the int32 key-block table, not FPSA configs
(`fpsa_jax.attention.kernel_layout` builds the operands and tables, `fpsa_jax.attention.triton`
wraps it).

Layout: Q, K [B, N, Lp, D] and V^T [B, N, D, Lp], tile major, every tile padded from P to Pp
slots (a multiple of BLOCK_N), valid slots first inside each tile; Lp = n_tiles * Pp. One program
computes BLOCK_M query rows of one query tile for one (batch, head): grid (Lp / BLOCK_M, B * N).
It walks exactly the key blocks of its query tile that hold a real token: `key_blocks`
[n_tiles, MAX_BLOCKS] (absolute key-block indices, block b in key tile b // (Pp / BLOCK_N)) and
`block_count` [n_tiles] (`kernel_layout.key_block_list` at BLOCK_N), with a dynamic trip count,
and an online softmax in base 2:

  s2 = (Q8 . K8^T) * (q_scale[u] * k_scale[v] * softmax_scale * log2(e)) + key_bias   (float32)
  m = running row max of s2;  p' = p_scale * exp2(s2 - m)
  l' += sum(p')  (unrounded);  acc = acc * exp2(m_old - m) + e4m3(p') . V8   (FP8 wgmma, f32 acc)
  o = acc / l' * v_scale  per channel,  written in o's dtype;  lse2 = m + log2(l' / p_scale).

So the scales are folded: one scalar per (query tile, key tile) pair multiplies the scores (it
carries log2(e) so the kernel uses exp2), P's static scale multiplies p after the exp2 (it
cancels between acc and l'; folded into the exponent as exp2(s2 - (m - log2 p_scale)) it would
lose the row max's low bits once |m| is large, e.g. 64 in float32 at 1e9: inputs of size 1e4
gave p' = 2^64), and the per-channel V scale is applied once at the end. P is rounded against
the running max. Padded key slots in a listed (partly real) block get a -inf bias; the running
max starts at a finite -1e30, so such slots give p = 0, never NaN. Padded query rows of a block
that holds a real row compute finite values that callers drop. A query block that is all padding
(its first slot's key bias is -inf: valid-first slots) runs no key block and writes lse2 = 0 and,
in the kernel layout, zero rows, so nothing downstream reads unwritten memory (the backward reads
lse2 at every slot). `lse2` (float32 [B, N, Lp], base 2, of the scaled scores) is what the
backward needs to rebuild P.

The output goes either to [B, N, Lp, D] (kernel layout) or, given the slot table of the pre-pass
(`slot_token` int32 [Lp], -1 for padding), straight to [B, L, N, D] in token order: each query
row is stored at its token and padded rows are not stored, which saves the reorder pass after.

Block shapes: BLOCK_N = 64 key slots (the k extent of the P.V dot; FP8 wgmma needs >= 32).
BLOCK_M = 128 (8 warps) when Pp is a multiple of 128, else 64 (4 warps): a query block must stay
inside one tile, since tiles have different key lists. A tile of (3, 8, 8) has P = Pp = 192, so
it runs BLOCK_M = 64. D must be a power of two (16..256).

16-bit operands run the same kernel with P cast to their dtype (p_scale 1, scales 1).

Not yet run on a GPU with the key-block list (written without one): the loop over a loaded bound
is `range(0, n)` there, a while loop under Triton's interpreter (WHILE_LOOP), which cannot take a
loaded bound in range().
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

LOG2_E = 1.4426950408889634
BLOCK_N = 64


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Block shape and Triton launch parameters of the forward."""

    block_m: int
    block_n: int = BLOCK_N
    num_warps: int = 4
    num_stages: int = 3


def default_launch(padded_tile: int) -> LaunchConfig:
    """The launch used unless the caller overrides it (picked on an H100, see RESULTS.md)."""
    if padded_tile % 128 == 0:
        return LaunchConfig(block_m=128, num_warps=8)
    return LaunchConfig(block_m=64, num_warps=4)


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the kernel exists only where Triton does
    triton = None

if triton is not None:
    # At module level, not inside `make_kernel`: Triton's interpreter re-executes a kernel's
    # source in its module's globals, where a closure's helpers are not found.
    @triton.jit
    def _key_block(
        block, acc, m_i, l_i, q, q_scale, k_ptr, vt_ptr, k_scale_ptr, key_bias_ptr,
        seq: tl.constexpr, k_blocks: tl.constexpr, HEAD_DIM: tl.constexpr,
        P_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, EMULATE_FP8_P: tl.constexpr,
    ):  # fmt: skip
        """One key block (absolute index `block`) into the online softmax of a query block."""
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        cols = block * BLOCK_N + offs_n
        k = tl.load(k_ptr + cols[:, None] * HEAD_DIM + offs_d[None, :])
        # V^T block [D, BLOCK_N]: contiguous along the keys, the k dim of the P.V dot.
        vt = tl.load(vt_ptr + offs_d[:, None] * seq + cols[None, :])
        pair_scale = q_scale * tl.load(k_scale_ptr + block // k_blocks)
        bias = tl.load(key_bias_ptr + cols)

        s = tl.dot(q, tl.trans(k)) * pair_scale + bias[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None]) * P_SCALE
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if EMULATE_FP8_P:
            # Triton 3.6's interpreter mis-rounds float32 -> fp8 casts (subnormals flushed,
            # carries into the exponent lost), so CPU tests round P to E4M3 in float32 here:
            # subnormals (x < 2^-6) have quantum 2^-9, which adding 2^14 leaves; normals keep
            # 3 of 23 mantissa bits, rounded to nearest even. Valid for 0 <= x <= 448.
            x = p
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
            x = tl.where(x < 0.015625, (x + 16384.0) - 16384.0, bits.to(tl.float32, bitcast=True))
            acc = tl.dot(x, tl.trans(vt).to(tl.float32), acc)
        else:
            # Hopper's FP8 wgmma accumulates with reduced precision, and Triton's default on
            # sm_90 never promotes to float32, so a long-running accumulator drifts: measured
            # at the 480p shape (588 key blocks), outputs 1.1% too small without this and
            # unbiased (least-squares scale 0.9993) with it, at no measurable cost.
            acc = tl.dot(p.to(vt.dtype), tl.trans(vt), acc, max_num_imprecise_acc=BLOCK_N)
        return acc, m_new, l_i


def make_kernel():
    """Builds the Triton kernel (importing this module needs no Triton; this does).

    Under TRITON_INTERPRET=1 (set before Triton is first imported) this returns Triton's CPU
    interpreter version (tests use it).
    """
    if triton is None:
        raise ImportError("the Triton FPSA kernels need triton (pip install 'fpsa-jax[gpu]')")

    @triton.jit
    def fpsa_fwd_kernel(
        q_ptr,  # [B, N, Lp, D] fp8 (or bf16/fp16)
        k_ptr,  # [B, N, Lp, D]
        vt_ptr,  # [B, N, D, Lp]
        q_scale_ptr,  # f32 [B, N, n_tiles]
        k_scale_ptr,  # f32 [B, N, n_tiles]
        v_scale_ptr,  # f32 [B, N, D]
        key_bias_ptr,  # f32 [Lp]: 0 (real slot) or -inf (padding)
        key_blocks_ptr,  # i32 [n_tiles, MAX_BLOCKS]: key blocks with a real token, -1 padded
        block_count_ptr,  # i32 [n_tiles]: real entries of each row of key_blocks
        slot_token_ptr,  # i32 [Lp]: token of each slot, -1 for padding (read if TOKEN_ORDER)
        o_ptr,  # [B, N, Lp, D], or [B, L, N, D] when TOKEN_ORDER
        lse_ptr,  # f32 [B, N, Lp]
        N_TILES: tl.constexpr,
        N_HEADS: tl.constexpr,
        TOKENS: tl.constexpr,  # L
        PP: tl.constexpr,
        MAX_BLOCKS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        QK_SCALE: tl.constexpr,  # softmax scale * log2(e)
        P_SCALE: tl.constexpr,  # P's static scale (448 for FP8, 1 otherwise)
        LOG2_P_SCALE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        EMULATE_FP8_P: tl.constexpr,
        TOKEN_ORDER: tl.constexpr,
        WHILE_LOOP: tl.constexpr,  # Triton's interpreter cannot take a loaded bound in range()
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        q_blocks: tl.constexpr = PP // BLOCK_M
        k_blocks: tl.constexpr = PP // BLOCK_N
        seq: tl.constexpr = N_TILES * PP
        q_tile = pid_m // q_blocks
        row0 = q_tile * PP + (pid_m % q_blocks) * BLOCK_M

        # One int64 offset per (batch, head) on the base pointers; the per-element offsets
        # below then stay int32 (seq * D < 2^31), which keeps address arithmetic cheap.
        head = bh.to(tl.int64) * seq * HEAD_DIM
        q_ptr += head
        k_ptr += head
        vt_ptr += head
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)

        q = tl.load(q_ptr + (row0 + offs_m)[:, None] * HEAD_DIM + offs_d[None, :])
        q_scale = tl.load(q_scale_ptr + bh * N_TILES + q_tile) * QK_SCALE

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        # Valid-first slots: a query block whose first slot is padding is all padding, and runs
        # no key block (l_i stays 0: see the end).
        live = tl.load(key_bias_ptr + row0) == 0.0
        count = tl.where(live, tl.load(block_count_ptr + q_tile), 0)
        blocks_ptr = key_blocks_ptr + q_tile * MAX_BLOCKS
        k_scale_ptr += bh * N_TILES
        if WHILE_LOOP:
            j = 0
            while j < count:
                acc, m_i, l_i = _key_block(
                    tl.load(blocks_ptr + j), acc, m_i, l_i, q, q_scale, k_ptr, vt_ptr,
                    k_scale_ptr, key_bias_ptr, seq, k_blocks, HEAD_DIM, P_SCALE, BLOCK_N,
                    EMULATE_FP8_P,
                )  # fmt: skip
                j += 1
        else:
            for j in range(0, count):
                acc, m_i, l_i = _key_block(
                    tl.load(blocks_ptr + j), acc, m_i, l_i, q, q_scale, k_ptr, vt_ptr,
                    k_scale_ptr, key_bias_ptr, seq, k_blocks, HEAD_DIM, P_SCALE, BLOCK_N,
                    EMULATE_FP8_P,
                )  # fmt: skip

        # Every row of a live block sees a real key (its own tile's), so l_i > 0 there; rows of
        # a skipped block have acc = 0 and l_i = 0, and get o = 0, lse2 = 0.
        written = l_i > 0.0
        l_safe = tl.where(written, l_i, 1.0)
        v_scale = tl.load(v_scale_ptr + bh * HEAD_DIM + offs_d)
        o = (acc * (1.0 / l_safe)[:, None] * v_scale[None, :]).to(o_ptr.dtype.element_ty)
        if TOKEN_ORDER:
            token = tl.load(slot_token_ptr + row0 + offs_m)
            o_ptr += (bh // N_HEADS).to(tl.int64) * TOKENS * N_HEADS * HEAD_DIM
            rows = tl.where(token >= 0, token, 0) * (N_HEADS * HEAD_DIM) + (bh % N_HEADS) * HEAD_DIM
            tl.store(o_ptr + rows[:, None] + offs_d[None, :], o, mask=(token >= 0)[:, None])
        else:
            o_ptr += head
            tl.store(o_ptr + (row0 + offs_m)[:, None] * HEAD_DIM + offs_d[None, :], o)
        lse = tl.where(written, m_i + tl.math.log2(l_safe) - LOG2_P_SCALE, 0.0)
        tl.store(lse_ptr + bh.to(tl.int64) * seq + row0 + offs_m, lse)

    return fpsa_fwd_kernel


kernel = functools.cache(make_kernel)


def kernel_meta(
    shape,
    padded_tile: int,
    max_blocks: int,
    scale: float,
    p_scale: float,
    launch: LaunchConfig,
    emulate_p: bool = False,
    tokens: int | None = None,
    while_loop: bool = False,
) -> dict:
    """The kernel's constexpr arguments and grid for Q of `shape` [B, N, Lp, D].

    `max_blocks` is the row length of the key-block table. `emulate_p` rounds P in float32
    instead of casting it to FP8, and `while_loop` loops over the key blocks with a while loop
    (both for Triton's interpreter only). `tokens` (L) selects the token-order output
    [B, L, N, D] (then pass the slot table).
    """
    b, n_heads, seq, d = shape
    if p_scale <= 0:
        raise ValueError(f"P's static scale must be positive, got {p_scale}")
    meta = dict(
        N_TILES=seq // padded_tile,
        N_HEADS=n_heads,
        TOKENS=int(tokens or 0),
        PP=padded_tile,
        MAX_BLOCKS=max_blocks,
        HEAD_DIM=d,
        QK_SCALE=float(scale) * LOG2_E,
        P_SCALE=float(p_scale),
        LOG2_P_SCALE=float(np.log2(p_scale)),
        BLOCK_M=launch.block_m,
        BLOCK_N=launch.block_n,
        EMULATE_FP8_P=bool(emulate_p),
        TOKEN_ORDER=tokens is not None,
        WHILE_LOOP=bool(while_loop),
    )
    return dict(meta=meta, grid=(seq // launch.block_m, b * n_heads))


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
    launch: LaunchConfig | None = None,
    slot_token: np.ndarray | None = None,
):
    """Runs the forward kernel through jax-triton.

    Args:
      q, k: [B, N, Lp, D] E4M3 (or 16-bit) values; v_t: [B, N, D, Lp].
      q_scale, k_scale: float32 [B, N, n_tiles]; v_scale: float32 [B, N, D].
      key_bias: float32 [Lp], 0 or -inf.
      key_blocks: host int32 [n_tiles, max_blocks], block_count: host int32 [n_tiles]: the key
        blocks of BLOCK_N slots that each query tile reads (`kernel_layout.key_block_list`).
      padded_tile: Pp. scale: softmax scale. p_scale: P's static FP8 scale (1 for 16-bit).
      slot_token: host int32 [Lp], the token of each slot (-1 padding); given, o is written in
        token order.

    Returns:
      (o, lse2 float32 [B, N, Lp]): o [B, N, Lp, D] in out_dtype (padded rows hold finite
      values: zeros, and lse2 0, in query blocks that are all padding), or [B, L, N, D] in token
      order when `slot_token` is given.
    """
    launch = launch or default_launch(padded_tile)
    b, n, seq, d = q.shape
    n_tiles = seq // padded_tile
    if np.ndim(key_blocks) != 2 or np.shape(key_blocks)[0] != n_tiles:
        raise ValueError(f"key_blocks must be [n_tiles={n_tiles}, M], got {np.shape(key_blocks)}")
    if np.shape(block_count) != (n_tiles,):
        raise ValueError(f"block_count must be [n_tiles={n_tiles}], got {np.shape(block_count)}")
    if slot_token is not None and np.shape(slot_token) != (seq,):
        raise ValueError(f"slot_token must be [Lp] = [{seq}], got shape {np.shape(slot_token)}")
    tokens = None if slot_token is None else int(np.count_nonzero(np.asarray(slot_token) >= 0))
    if slot_token is None:
        slot_token = np.zeros((1,), np.int32)  # a placeholder pointer; the kernel never reads it
    call = kernel_meta(
        q.shape, padded_tile, np.shape(key_blocks)[1], scale, p_scale, launch, tokens=tokens
    )
    o_shape = q.shape if tokens is None else (b, tokens, n, d)
    import jax_triton as jt  # after the checks: they need no GPU

    return jt.triton_call(
        q,
        k,
        v_t,
        q_scale,
        k_scale,
        v_scale,
        key_bias,
        jnp.asarray(np.ascontiguousarray(key_blocks, dtype=np.int32)),
        jnp.asarray(np.ascontiguousarray(block_count, dtype=np.int32)),
        jnp.asarray(np.ascontiguousarray(slot_token, dtype=np.int32)),
        kernel=kernel(),
        out_shape=(
            jax.ShapeDtypeStruct(o_shape, out_dtype),
            jax.ShapeDtypeStruct((b, n, seq), jnp.float32),
        ),
        grid=call["grid"],
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
        name="fpsa_fwd",
        **call["meta"],
    )
