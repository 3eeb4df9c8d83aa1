"""Wan's q/k RMSNorm and the 3D RoPE rotation after it, in one pass per token (Triton).

Arrays only, like the other modules here: `fpsa_jax.model.norms.rms_norm` defines the values (its
jnp function is the reference) and decides when this kernel writes them.

Each program owns one token's row x [DIM] (DIM = N * D, all heads), walked in CHUNK-wide steps (4
warps): first the mean of squares over the row, then, per step,

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
        DIM: tl.constexpr,
        L: tl.constexpr,
        HALF_D: tl.constexpr,
        EPS: tl.constexpr,
        AFFINE: tl.constexpr,
        ROPE: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        # The row is taken as [CHUNK / 2, 2] channel pairs (contiguous in memory): RoPE rotates
        # each pair, and split / join keep both halves in one thread. Phase 0 sums the squares,
        # phase 1 writes; one body, unrolled twice at compile time.
        row = tl.program_id(0)
        base = row.to(tl.int64) * DIM
        pairs = tl.arange(0, CHUNK // 2)
        two = tl.arange(0, 2)
        angle_row = (row % L).to(tl.int64) * HALF_D
        total = tl.zeros([CHUNK // 2, 2], tl.float32)
        rstd = 1.0
        for phase in tl.static_range(2):
            if phase == 1:
                mean_square = tl.math.div_rn(tl.sum(tl.sum(total, axis=1), axis=0), DIM)
                rstd = tl.math.div_rn(1.0, tl.sqrt_rn(mean_square + EPS))
            for start in range(0, DIM, CHUNK):
                pair = start // 2 + pairs  # pair index within the row
                offs = 2 * pair[:, None] + two[None, :]
                inside = offs < DIM
                x = tl.load(x_ptr + base + offs, mask=inside, other=0.0)
                if AFFINE > 0:  # the linear's epilogue, rounded to its output dtype
                    b = tl.load(bias_ptr + offs, mask=inside, other=0.0).to(tl.float32)
                    y = x.to(tl.float32)
                    if AFFINE == 2:
                        cs = tl.load(col_scale_ptr + offs, mask=inside, other=0.0)
                        y = y * tl.load(row_scale_ptr + row) * cs
                    x = (y + b).to(x_ptr.dtype.element_ty)
                x = x.to(tl.float32)
                if phase == 0:
                    total += x * x
                else:
                    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
                    y = normed * tl.load(scale_ptr + offs, mask=inside, other=0.0)
                    if ROPE:
                        re, im = tl.split(y)
                        freq = pair % HALF_D
                        cos = tl.load(cos_ptr + angle_row + freq, mask=pair < DIM // 2, other=1.0)
                        sin = tl.load(sin_ptr + angle_row + freq, mask=pair < DIM // 2, other=0.0)
                        y = tl.join(re * cos - im * sin, re * sin + im * cos)
                    tl.store(out_ptr + base + offs, y.to(out_ptr.dtype.element_ty), mask=inside)

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
    chunk=CHUNK,
):
    """The kernel's constexpr arguments, grid and warp count for an [rows, dim] input whose row r
    is token r % length of the angle tables."""
    if dim > MAX_ROW:
        raise ValueError(f"rows of {dim} values exceed the kernel's {MAX_ROW}")
    if dim % 2 or head_dim % 2 or dim % head_dim:
        raise ValueError(f"rows of {dim} values do not split into heads of {head_dim} (even)")
    if affine not in (0, 1, 2):
        raise ValueError(f"affine must be 0 (none), 1 (bias) or 2 (scales and bias), got {affine}")
    if rows < 1 or length < 1:
        raise ValueError(f"need at least one row and one token, got {rows} and {length}")
    meta = dict(
        DIM=dim,
        L=length,
        HALF_D=head_dim // 2,
        EPS=float(eps),
        AFFINE=int(affine),
        ROPE=bool(rope),
        CHUNK=max(2, min(chunk, _next_pow2(dim))),
    )
    return dict(meta=meta, grid=(rows,), num_warps=4)


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
