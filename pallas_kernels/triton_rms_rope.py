"""Wan's q/k RMSNorm and the 3D RoPE rotation after it, in one pass per token (Triton).

Arrays only, like the other modules here: `fpsa_jax.model.norms.rms_norm` defines the values (its
jnp function is the reference) and decides when this kernel writes them.

Each program owns ROWS tokens' rows x [DIM] (DIM = N * D, all heads; ROWS = 1 by default, more
share each load of the per-channel operands), walked in CHUNK-wide steps (4 warps): first the
mean of squares over each row, then, per step,

    AFFINE 1:  x = round_to_x_dtype(x + bias)                  (the float linear's bias add)
    AFFINE 2:  x = round_to_x_dtype(x * row_scale * col_scale + bias)   (the FP8 linear's)
    n = round_to_x_dtype(x * rsqrt(mean(x^2) + eps)) * scale          (float32)
    ROPE:  (n[2i], n[2i+1]) rotated by the token's angle of pair i % (D / 2)
    out = n, written in out's dtype

The row comes from DRAM once (the second walk re-reads it from L2) and goes out once. XLA writes
the same work as three to four passes (the reduction, the normalise-and-scale, RoPE's stack of
the rotated pairs, the cast to the attention dtype).

x is [M, DIM] in float32, bfloat16 or float16 (with AFFINE the linear's GEMM sums, in its output
dtype), row r the token r % L of the [L, D/2] float32 angle tables cos, sin (unused without
ROPE); scale float32 [DIM]; out [M, DIM]. The epilogue is recomputed in both walks: it is cheaper
than writing the linear's output and reading it back, which is what XLA does otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

MAX_ROW = 65536  # values of one row (its re-read should stay in L2)
CHUNK = 1024  # values per step of a program (4 warps, 8 per thread)


def make_kernel():
    """Builds the Triton kernel (Triton is imported here, so importing this module needs none)."""
    import triton
    import triton.language as tl

    @triton.jit
    def rms_rope_kernel(
        x_ptr,  # [M, DIM]: the linear's output, or its GEMM sums (AFFINE)
        bias_ptr,  # AFFINE >= 1: the linear's bias [DIM] (in its epilogue's dtype)
        row_scale_ptr,  # AFFINE == 2: f32 [M]
        col_scale_ptr,  # AFFINE == 2: f32 [DIM]
        scale_ptr,  # f32 [DIM], the norm's weight
        cos_ptr,  # f32 [L, HALF_D]
        sin_ptr,  # f32 [L, HALF_D]
        out_ptr,  # [M, DIM]
        M: tl.constexpr,
        DIM: tl.constexpr,
        L: tl.constexpr,
        HALF_D: tl.constexpr,
        EPS: tl.constexpr,
        AFFINE: tl.constexpr,
        ROPE: tl.constexpr,
        ROWS: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        # ROWS rows per program, CHUNK channels of each per step, loaded and stored flat (16-byte
        # accesses; the [CHUNK / 2, 2] pair layout that RoPE's split / join wants gave 4-byte ones
        # and shared-memory shuffles in sm_90 builds): the reshape to pairs stays in registers.
        # The per-channel operands (bias, column scales, the norm's weight) load once per step
        # for all ROWS rows. Phase 0 sums the squares, phase 1 writes; one body, unrolled twice.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        live = rows < M  # the last program may hold fewer rows
        base = (tl.where(live, rows, 0).to(tl.int64) * DIM)[:, None]
        cols = tl.arange(0, CHUNK)
        pairs = tl.arange(0, CHUNK // 2)
        angle_row = ((rows % L).to(tl.int64) * HALF_D)[:, None]
        total = tl.zeros([ROWS, CHUNK], tl.float32)
        rstd = tl.full([ROWS, 1], 1.0, tl.float32)
        for phase in tl.static_range(2):
            if phase == 1:
                mean_square = tl.math.div_rn(tl.sum(total, axis=1), DIM)
                rstd = tl.math.div_rn(1.0, tl.sqrt_rn(mean_square + EPS))[:, None]
            for start in range(0, DIM, CHUNK):
                offs = start + cols
                inside = offs < DIM
                mask = live[:, None] & inside[None, :]
                x = tl.load(x_ptr + base + offs[None, :], mask=mask, other=0.0)
                if AFFINE > 0:  # the linear's epilogue, rounded to its output dtype
                    b = tl.load(bias_ptr + offs, mask=inside, other=0.0).to(tl.float32)
                    y = x.to(tl.float32)
                    if AFFINE == 2:
                        cs = tl.load(col_scale_ptr + offs, mask=inside, other=0.0)
                        rs = tl.load(row_scale_ptr + rows, mask=live, other=0.0)
                        y = y * rs[:, None] * cs[None, :]
                    x = (y + b[None, :]).to(x_ptr.dtype.element_ty)
                x = x.to(tl.float32)
                if phase == 0:
                    total += x * x
                else:
                    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
                    weight = tl.load(scale_ptr + offs, mask=inside, other=0.0)
                    y = normed * weight[None, :]
                    if ROPE:
                        re, im = tl.split(tl.reshape(y, [ROWS, CHUNK // 2, 2]))
                        pair = start // 2 + pairs  # pair index within the row
                        freq = (pair % HALF_D)[None, :]
                        on = live[:, None] & (pair < DIM // 2)[None, :]
                        cos = tl.load(cos_ptr + angle_row + freq, mask=on, other=1.0)
                        sin = tl.load(sin_ptr + angle_row + freq, mask=on, other=0.0)
                        rotated = tl.join(re * cos - im * sin, re * sin + im * cos)
                        y = tl.reshape(rotated, [ROWS, CHUNK])
                    out = out_ptr + base + offs[None, :]
                    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)

    return rms_rope_kernel


kernel = functools.cache(make_kernel)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


def kernel_meta(
    rows: int,
    dim: int,
    *,
    length: int = 1,
    head_dim: int = 2,
    eps: float,
    rope: bool,
    affine: int = 0,
    rows_per_program: int = 1,
    chunk=CHUNK,
):
    """The kernel's constexpr arguments, grid and warp count for an [rows, dim] input whose row r
    is token r % length of the angle tables; `rows_per_program` rows (a power of two) share each
    program, and each step then covers chunk / rows_per_program channels of each."""
    if dim > MAX_ROW:
        raise ValueError(f"rows of {dim} values exceed the kernel's {MAX_ROW}")
    if dim % 2 or head_dim % 2 or dim % head_dim:
        raise ValueError(f"rows of {dim} values do not split into heads of {head_dim} (even)")
    if affine not in (0, 1, 2):
        raise ValueError(f"affine must be 0 (none), 1 (bias) or 2 (scales and bias), got {affine}")
    if rows < 1 or length < 1:
        raise ValueError(f"need at least one row and one token, got {rows} and {length}")
    if rows_per_program not in (1, 2, 4, 8):
        raise ValueError(f"rows_per_program must be 1, 2, 4 or 8, got {rows_per_program}")
    meta = dict(
        M=rows,
        DIM=dim,
        L=length,
        HALF_D=head_dim // 2,
        EPS=float(eps),
        AFFINE=int(affine),
        ROPE=bool(rope),
        ROWS=rows_per_program,
        CHUNK=max(2, min(chunk // rows_per_program, _next_pow2(dim))),
    )
    return dict(meta=meta, grid=(-(-rows // rows_per_program),), num_warps=4)


def rms_norm_rope(
    x: jax.Array,
    scale: jax.Array,
    eps: float,
    cos: jax.Array | None = None,
    sin: jax.Array | None = None,
    *,
    bias: jax.Array | None = None,
    row_scale: jax.Array | None = None,
    col_scale: jax.Array | None = None,
    head_dim: int = 2,
    out_dtype=None,
    rows_per_program: int = 1,
) -> jax.Array:
    """Runs the kernel through jax-triton.

    Args:
      x: [..., L, DIM] (with tables) or [..., DIM]; with bias, a linear's GEMM sums.
      scale: [DIM], the RMSNorm weight (float32 in the kernel).
      cos, sin: [L, head_dim / 2] RoPE angle tables, or None for the norm alone.
      bias: [DIM], the linear's bias, added first (AFFINE 1); with row_scale [..., 1] and
        col_scale [DIM] after scaling x (AFFINE 2).
      head_dim: D, the channels of one head (DIM = N * D); used with tables.
      out_dtype: the output dtype (default x's).
      rows_per_program: rows sharing a program (1, 2, 4 or 8): the values do not depend on it.

    Returns:
      [..., DIM] in out_dtype.
    """
    *lead, dim = x.shape
    rows = 1
    for n in lead:
        rows *= n
    rope = cos is not None
    length = x.shape[-2] if rope else 1
    if rope and (cos.shape != (length, head_dim // 2) or sin.shape != cos.shape):
        raise ValueError(
            f"RoPE tables must be [{length}, {head_dim // 2}] for x {x.shape}, got "
            f"{cos.shape} and {sin.shape}"
        )
    if scale.shape != (dim,):
        raise ValueError(f"the RMSNorm scale must be [{dim}], got {scale.shape}")
    affine = 0 if bias is None else 1 if row_scale is None else 2
    if affine and bias.size != dim:
        raise ValueError(f"the linear's bias must hold {dim} values, got {bias.shape}")
    if affine == 2 and (row_scale.size != rows or col_scale is None or col_scale.size != dim):
        raise ValueError(
            f"the FP8 linear's scales must hold {rows} rows and {dim} channels, got "
            f"{row_scale.shape} and {None if col_scale is None else col_scale.shape}"
        )
    call = kernel_meta(
        rows,
        dim,
        length=length,
        head_dim=head_dim if rope else 2,
        eps=eps,
        rope=rope,
        affine=affine,
        rows_per_program=rows_per_program,
    )
    unused = jnp.zeros((1,), jnp.float32)  # a placeholder pointer the kernel never reads
    cos, sin, row_scale, col_scale = (
        unused if t is None else jnp.asarray(t, jnp.float32).reshape(-1)
        for t in (cos, sin, row_scale, col_scale)
    )
    bias = unused if bias is None else bias.reshape(-1)
    import jax_triton as jt  # after the checks: they need no GPU

    out = jt.triton_call(
        x.reshape(rows, dim),
        bias,
        row_scale,
        col_scale,
        scale.astype(jnp.float32),
        cos,
        sin,
        kernel=kernel(),
        out_shape=jax.ShapeDtypeStruct((rows, dim), out_dtype or x.dtype),
        grid=call["grid"],
        num_warps=call["num_warps"],
        num_stages=1,
        name="rms_norm_rope" if rope else "rms_norm",
        **call["meta"],
    )
    return out.reshape(x.shape)
