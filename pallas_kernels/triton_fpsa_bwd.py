"""Block-sparse flash-attention backward over 3D tiles (16-bit): two Triton kernels.

Arrays only, in the forward's layout (`triton_fpsa_fwd`): Q, K, V, dO [B, N, Lp, D] tile major
(V not transposed here), Lp = n_tiles * Pp. The forward's `lse2` [B, N, Lp] (base 2, of the
scaled scores) rebuilds the attention weights without a second softmax pass:

  s2 = (Q . K^T) * softmax_scale * log2(e) + key_bias,   P = exp2(s2 - lse2)
  delta = rowsum(dO * O)                                 (float32 [B, N, Lp], computed outside)
  dP = dO . V^T,   dS = P * (dP - delta)
  dQ = softmax_scale * dS . K,   dK = softmax_scale * dS^T . Q,   dV = P^T . dO

- `dq` kernel: grid (Lp / BLOCK_M, B * N); a program owns BLOCK_M query rows of one query tile
  and walks the same compressed key-tile list as the forward (`kv_tiles` [n_tiles, kv_count]).
- `dkdv` kernel: grid (Lp / BLOCK_N, B * N); a program owns BLOCK_N key rows of one key tile and
  walks the transposed list (`q_tiles` [n_tiles, max_q], padded with -1, `q_count` [n_tiles]
  real entries), so no atomics are needed.

Padded key slots have bias -inf, so P = 0 there and their dK, dV rows are 0. Padded query rows
must come with dO = 0 (and so delta = 0) and a finite lse2, which the forward guarantees; then
they contribute nothing. Matmuls take 16-bit operands (P and dS are cast to Q's dtype) and
accumulate in float32; dQ, dK, dV are written in float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

LOG2_E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class BackwardLaunch:
    """Block shapes and Triton launch parameters of the two backward kernels."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the kernels exist only where Triton does
    triton = None


def make_kernels():
    """(dq_kernel, dkdv_kernel). Triton must be imported after TRITON_INTERPRET=1 is set for the
    interpreter; there, launch the dkdv kernel with WHILE_LOOP=True (the interpreter cannot loop
    over a loaded bound with range; on GPU a while loop would not be software pipelined)."""
    if triton is None:
        raise ImportError("the Triton FPSA kernels need triton (pip install 'fpsa-jax[gpu]')")
    return _dq_kernel, _dkdv_kernel


if triton is not None:

    @triton.jit
    def _dq_kernel(
        q_ptr,  # [B, N, Lp, D] 16-bit
        k_ptr,  # [B, N, Lp, D]
        v_ptr,  # [B, N, Lp, D]
        do_ptr,  # [B, N, Lp, D]
        lse_ptr,  # f32 [B, N, Lp]
        delta_ptr,  # f32 [B, N, Lp]
        key_bias_ptr,  # f32 [Lp]
        kv_tiles_ptr,  # i32 [n_tiles, KV_COUNT]
        dq_ptr,  # f32 [B, N, Lp, D]
        N_TILES: tl.constexpr,
        PP: tl.constexpr,
        KV_COUNT: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        QK_SCALE: tl.constexpr,  # softmax scale * log2(e)
        SM_SCALE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        q_blocks: tl.constexpr = PP // BLOCK_M
        k_blocks: tl.constexpr = PP // BLOCK_N
        seq: tl.constexpr = N_TILES * PP
        q_tile = pid_m // q_blocks
        rows = q_tile * PP + (pid_m % q_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        # One int64 offset per (batch, head) on the base pointers; element offsets stay int32.
        head = bh * seq * HEAD_DIM
        q_ptr += head
        k_ptr += head
        v_ptr += head
        do_ptr += head
        dq_ptr += head
        lse_ptr += bh * seq
        delta_ptr += bh * seq

        row_ptrs = rows[:, None] * HEAD_DIM + offs_d[None, :]
        q = tl.load(q_ptr + row_ptrs)
        do = tl.load(do_ptr + row_ptrs)
        lse = tl.load(lse_ptr + rows)
        delta = tl.load(delta_ptr + rows)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        for j in range(0, KV_COUNT * k_blocks):
            kv_tile = tl.load(kv_tiles_ptr + q_tile * KV_COUNT + j // k_blocks)
            cols = kv_tile * PP + (j % k_blocks) * BLOCK_N + offs_n
            col_ptrs = cols[:, None] * HEAD_DIM + offs_d[None, :]
            k = tl.load(k_ptr + col_ptrs)
            v = tl.load(v_ptr + col_ptrs)
            bias = tl.load(key_bias_ptr + cols)
            s = tl.dot(q, tl.trans(k)) * QK_SCALE + bias[None, :]
            p = tl.math.exp2(s - lse[:, None])
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq)

        tl.store(dq_ptr + row_ptrs, dq * SM_SCALE)

    @triton.jit
    def _dkdv_step(
        i, dk, dv, k, v, bias, q_ptr, do_ptr, lse_ptr, delta_ptr, q_tiles_ptr, k_tile,
        PP: tl.constexpr, MAX_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
        QK_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, q_blocks: tl.constexpr,
    ):  # fmt: skip
        """One query block (the i-th of this key tile's transposed list) into dK, dV."""
        q_tile = tl.load(q_tiles_ptr + k_tile * MAX_Q + i // q_blocks)
        rows = q_tile * PP + (i % q_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ptrs = rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
        q = tl.load(q_ptr + row_ptrs)
        do = tl.load(do_ptr + row_ptrs)
        lse = tl.load(lse_ptr + rows)
        delta = tl.load(delta_ptr + rows)
        s_t = tl.dot(k, tl.trans(q)) * QK_SCALE + bias[:, None]  # [BLOCK_N, BLOCK_M]
        p_t = tl.math.exp2(s_t - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
        return dk, dv

    @triton.jit
    def _dkdv_kernel(
        q_ptr,  # [B, N, Lp, D] 16-bit
        k_ptr,  # [B, N, Lp, D]
        v_ptr,  # [B, N, Lp, D]
        do_ptr,  # [B, N, Lp, D]
        lse_ptr,  # f32 [B, N, Lp]
        delta_ptr,  # f32 [B, N, Lp]
        key_bias_ptr,  # f32 [Lp]
        q_tiles_ptr,  # i32 [n_tiles, MAX_Q], -1 padded
        q_count_ptr,  # i32 [n_tiles]
        dk_ptr,  # f32 [B, N, Lp, D]
        dv_ptr,  # f32 [B, N, Lp, D]
        N_TILES: tl.constexpr,
        PP: tl.constexpr,
        MAX_Q: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        QK_SCALE: tl.constexpr,
        SM_SCALE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        WHILE_LOOP: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        q_blocks: tl.constexpr = PP // BLOCK_M
        k_blocks: tl.constexpr = PP // BLOCK_N
        seq: tl.constexpr = N_TILES * PP
        k_tile = pid_n // k_blocks
        cols = k_tile * PP + (pid_n % k_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        head = bh * seq * HEAD_DIM
        q_ptr += head
        k_ptr += head
        v_ptr += head
        do_ptr += head
        dk_ptr += head
        dv_ptr += head
        lse_ptr += bh * seq
        delta_ptr += bh * seq

        col_ptrs = cols[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_ptr + col_ptrs)
        v = tl.load(v_ptr + col_ptrs)
        bias = tl.load(key_bias_ptr + cols)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

        count = tl.load(q_count_ptr + k_tile) * q_blocks
        if WHILE_LOOP:  # Triton's interpreter cannot take a loaded bound in range()
            i = 0
            while i < count:
                dk, dv = _dkdv_step(
                    i, dk, dv, k, v, bias, q_ptr, do_ptr, lse_ptr, delta_ptr, q_tiles_ptr,
                    k_tile, PP, MAX_Q, HEAD_DIM, QK_SCALE, BLOCK_M, q_blocks,
                )  # fmt: skip
                i += 1
        else:
            for i in range(0, count):
                dk, dv = _dkdv_step(
                    i, dk, dv, k, v, bias, q_ptr, do_ptr, lse_ptr, delta_ptr, q_tiles_ptr,
                    k_tile, PP, MAX_Q, HEAD_DIM, QK_SCALE, BLOCK_M, q_blocks,
                )  # fmt: skip

        tl.store(dk_ptr + col_ptrs, dk * SM_SCALE)
        tl.store(dv_ptr + col_ptrs, dv)


kernels = functools.cache(make_kernels)


def kernel_meta(shape, padded_tile: int, scale: float, launch: BackwardLaunch) -> dict:
    """Constexpr arguments of both kernels and their grids, for Q of `shape` [B, N, Lp, D]."""
    b, n_heads, seq, d = shape
    meta = dict(
        N_TILES=seq // padded_tile,
        PP=padded_tile,
        HEAD_DIM=d,
        QK_SCALE=float(scale) * LOG2_E,
        SM_SCALE=float(scale),
        BLOCK_M=launch.block_m,
        BLOCK_N=launch.block_n,
    )
    return dict(
        meta=meta,
        dq_grid=(seq // launch.block_m, b * n_heads),
        dkdv_grid=(seq // launch.block_n, b * n_heads),
    )


def fpsa_backward(
    q,
    k,
    v,
    do,
    lse,
    delta,
    key_bias,
    kv_tiles: np.ndarray,
    q_tiles: np.ndarray,
    q_count: np.ndarray,
    *,
    padded_tile: int,
    scale: float,
    launch: BackwardLaunch | None = None,
):
    """Runs both backward kernels through jax-triton.

    Args:
      q, k, v, do: [B, N, Lp, D], one 16-bit dtype; rows of padded slots zero in do.
      lse: float32 [B, N, Lp] from the forward; delta: float32 [B, N, Lp] = rowsum(do * o).
      key_bias: float32 [Lp], 0 or -inf.
      kv_tiles: host int32 [n_tiles, kv_count]; q_tiles: host int32 [n_tiles, max_q] (-1
        padded); q_count: host int32 [n_tiles].
      padded_tile: Pp. scale: softmax scale.

    Returns:
      (dq, dk, dv), float32 [B, N, Lp, D].
    """
    import jax_triton as jt

    launch = launch or BackwardLaunch()
    dq_kernel, dkdv_kernel = kernels()
    call = kernel_meta(q.shape, padded_tile, scale, launch)
    grad = jax.ShapeDtypeStruct(q.shape, jnp.float32)

    def table(x):
        return jnp.asarray(np.ascontiguousarray(x, dtype=np.int32))

    dq = jt.triton_call(
        q,
        k,
        v,
        do,
        lse,
        delta,
        key_bias,
        table(kv_tiles),
        kernel=dq_kernel,
        out_shape=grad,
        grid=call["dq_grid"],
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
        name="fpsa_bwd_dq",
        KV_COUNT=kv_tiles.shape[1],
        **call["meta"],
    )
    dk, dv = jt.triton_call(
        q,
        k,
        v,
        do,
        lse,
        delta,
        key_bias,
        table(q_tiles),
        table(q_count),
        kernel=dkdv_kernel,
        out_shape=(grad, grad),
        grid=call["dkdv_grid"],
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
        name="fpsa_bwd_dkdv",
        MAX_Q=q_tiles.shape[1],
        WHILE_LOOP=False,
        **call["meta"],
    )
    return dq, dk, dv
