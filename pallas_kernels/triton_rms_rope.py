"""Wan's q/k RMSNorm and the 3D RoPE rotation after it, in one pass per token (Triton).

Arrays only, like the other modules here: `fpsa_jax.model.norms.rms_norm` defines the values (its
jnp function is the reference) and decides when this kernel writes them.

Each program owns one token's row x [DIM] (DIM = N * D, all heads), walked in CHUNK-wide steps (4
warps): first the mean of squares over the row, then, per step,

    n = round_to_x_dtype(x * rsqrt(mean(x^2) + eps)) * scale          (float32)
    ROPE:  (n[2i], n[2i+1]) rotated by the token's angle of pair i % (D / 2)
    out = n, written in out's dtype

The row comes from DRAM once (the second walk re-reads it from L2) and goes out once. XLA writes
the same work as three to four passes (the reduction, the normalise-and-scale, RoPE's stack of
the rotated pairs, the cast to the attention dtype).

x is [M, DIM] in float32, bfloat16 or float16, row r the token r % L of the [L, D/2] float32
angle tables cos, sin (unused without ROPE); scale float32 [DIM]; out [M, DIM].
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
        x_ptr,  # [M, DIM]
        scale_ptr,  # f32 [DIM]
        cos_ptr,  # f32 [L, HALF_D]
        sin_ptr,  # f32 [L, HALF_D]
        out_ptr,  # [M, DIM]
        DIM: tl.constexpr,
        L: tl.constexpr,
        HALF_D: tl.constexpr,
        EPS: tl.constexpr,
        ROPE: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        row = tl.program_id(0)
        base = row.to(tl.int64) * DIM
        cols = tl.arange(0, CHUNK)
        total = tl.zeros([CHUNK], tl.float32)
        for start in range(0, DIM, CHUNK):
            x = tl.load(x_ptr + base + start + cols, mask=start + cols < DIM, other=0.0)
            x = x.to(tl.float32)
            total += x * x
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(tl.sum(total, axis=0), DIM) + EPS))

        # The second walk takes the row as [CHUNK / 2, 2] channel pairs (contiguous in memory):
        # RoPE rotates each pair, and split / join keep both halves in one thread.
        pairs = tl.arange(0, CHUNK // 2)
        two = tl.arange(0, 2)
        angle_row = (row % L).to(tl.int64) * HALF_D
        for start in range(0, DIM, CHUNK):
            pair = start // 2 + pairs  # pair index within the row
            offs = 2 * pair[:, None] + two[None, :]
            inside = offs < DIM
            x = tl.load(x_ptr + base + offs, mask=inside, other=0.0)
            normed = (x.to(tl.float32) * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
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
    rows: int, dim: int, *, length: int = 1, head_dim: int = 2, eps: float, rope: bool, chunk=CHUNK
):
    """The kernel's constexpr arguments, grid and warp count for an [rows, dim] input whose row r
    is token r % length of the angle tables."""
    if dim > MAX_ROW:
        raise ValueError(f"rows of {dim} values exceed the kernel's {MAX_ROW}")
    if dim % 2 or head_dim % 2 or dim % head_dim:
        raise ValueError(f"rows of {dim} values do not split into heads of {head_dim} (even)")
    if rows < 1 or length < 1:
        raise ValueError(f"need at least one row and one token, got {rows} and {length}")
    meta = dict(
        DIM=dim,
        L=length,
        HALF_D=head_dim // 2,
        EPS=float(eps),
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
    head_dim: int = 2,
    out_dtype=None,
) -> jax.Array:
    """Runs the kernel through jax-triton.

    Args:
      x: [..., L, DIM] (with tables) or [..., DIM].
      scale: [DIM], the RMSNorm weight (float32 in the kernel).
      cos, sin: [L, head_dim / 2] RoPE angle tables, or None for the norm alone.
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
    call = kernel_meta(
        rows, dim, length=length, head_dim=head_dim if rope else 2, eps=eps, rope=rope
    )
    unused = jnp.zeros((1,), jnp.float32)  # a placeholder pointer the kernel never reads
    cos, sin = (unused if t is None else jnp.asarray(t, jnp.float32) for t in (cos, sin))
    import jax_triton as jt  # after the checks: they need no GPU

    out = jt.triton_call(
        x.reshape(rows, dim),
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
