"""Per-row FP8 quantization of a linear's input, fused with the pass that produces it (Triton).

Arrays only, like the other modules here: `fpsa_jax.model.fp8_linear` defines the values (its XLA
functions are the reference) and decides when this kernel writes them.

Each program owns ROWS rows of K values (4 by default), walked in [ROWS, CHUNK] steps (4 warps),
each per-column operand loaded once per step for all of them: LayerNorm's mean and
variance (one walk each over the row), then the producer's absmax over the finite values, scale =
absmax / 448 (1 for an all-zero row), then the producer again, times 1 / scale, saturated to +-448
and cast to E4M3 (round to nearest even, Hopper's `cvt.rn.satfinite`). The input comes from DRAM
once (the re-reads of a row hit L2) and 1 byte per value plus one float32 scale per row go out.
XLA's version of the same work is two or three DRAM passes (a reduction for the absmax, one for
LayerNorm's statistics, and the convert, each recomputing the producer). A first version held the
whole row in registers: one row in flight per SM, ~1 TB/s (benchmarks/RESULTS.md).

  prologue "none":       y = x
  prologue "layernorm":  y = (x - mean) * rsqrt(var + eps) * mul[batch] + add[batch]
                         (two-pass variance in float32; mul, add float32 [B, K], row r in batch
                         r // rows_per_batch): LayerNorm + modulation, or an affine LayerNorm
  prologue "gelu":       y = gelu_tanh((x * row_scale[r]) * col_scale + bias): the FP8 GEMM's
                         bfloat16 sums x [M, K] dequantized (per-token and per-channel scales),
                         plus the bias, through GELU (tanh form), i.e. FFN fc1's output as fc2's
                         input. Its absmax walk evaluates no GELU: GELU increases for u > -0.75
                         and stays above -0.17005, so a row's absmax is GELU(max u) whenever that
                         is >= GELU_FLOOR = 0.171 (the rows of a real FFN); only rows below that
                         walk again through GELU (gelu_absmax "walk" always does, for timing).

x is [M, K] in float32, bfloat16 or float16; the values come out [M, K] in `out_dtype`
(float8_e4m3fn; float32 for Triton's interpreter, whose fp8 cast is wrong), the scales float32
[M].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

PROLOGUES = {"none": 0, "layernorm": 1, "gelu": 2}
GELU_ABSMAX = {"walk": 0, "from_max": 1}  # how the "gelu" prologue finds its absmax (docstring)
GELU_FLOOR = 0.171  # above the tanh form's |min| = 0.170041 (at u = -0.7525), with margin
MAX_ROW = 65536  # values of one row (its re-reads should stay in L2)
CHUNK = 1024  # columns per step of a program (4 warps, 8 float32 values per thread and row)
ROWS_PER_PROGRAM = 4  # rows walked together by one program (see kernel_meta; RESULTS.md)


def make_kernel():
    """Builds the Triton kernel (Triton is imported here, so importing this module needs none)."""
    import triton
    import triton.language as tl

    # Module level: the kernel calls them by name, and Triton's interpreter looks names up in the
    # module's globals (the compiler would find closures too).
    global gelu_input, gelu_tanh

    @triton.jit
    def gelu_input(x_ptr, row_scale_ptr, col_scale_ptr, bias_ptr, rows, base, offs, row_ok, col_ok):
        """u [R, C] = sums * row scale * column scale + bias, float32: fc1's output, GELU's input
        (rows, base: [R] indices and offsets; offs, col_ok: [C])."""
        inside = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + base[:, None] + offs[None, :], mask=inside, other=0.0).to(tl.float32)
        row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
        col_scale = tl.load(col_scale_ptr + offs, mask=col_ok, other=0.0)
        bias = tl.load(bias_ptr + offs, mask=col_ok, other=0.0)
        return x * row_scale[:, None] * col_scale[None, :] + bias[None, :]

    @triton.jit
    def gelu_tanh(u):
        # 0.5 u (1 + tanh(z)) = u * sigmoid(2z) = u / (1 + exp(-2z)): one exp and one approximate
        # division (2 ulp; the E4M3 rounding after it is 2^-4). Tails: exp -> inf gives -0,
        # exp -> 0 gives u.
        z = 0.7978845608028654 * (u + 0.044715 * u * u * u)
        return tl.fdiv(u, 1.0 + tl.exp(-2.0 * z), ieee_rounding=False)

    @triton.jit
    def row_quant_kernel(
        x_ptr,  # [M, K]
        a_ptr,  # layernorm: mul f32 [B, K]; gelu: row scales f32 [M]; none: unused
        b_ptr,  # layernorm: add f32 [B, K]; gelu: column scales f32 [K]; none: unused
        c_ptr,  # gelu: bias f32 [K]; otherwise unused
        out_ptr,  # [M, K]
        scale_ptr,  # f32 [M]
        M: tl.constexpr,
        K: tl.constexpr,
        ROWS: tl.constexpr,
        ROWS_PER_BATCH: tl.constexpr,
        EPS: tl.constexpr,
        PROLOGUE: tl.constexpr,
        GELU_ABSMAX: tl.constexpr,
        GELU_FLOOR: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        # ROWS rows are walked together in [ROWS, CHUNK] pieces, once per statistic (LayerNorm's
        # mean and variance, the absmax) and once to write: small programs, many rows in flight
        # per SM; the re-reads of a row (<= 64 KB) come from L2, and each per-column operand
        # (modulation, column scales, bias) is loaded once per piece for all ROWS rows.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < M
        base = rows.to(tl.int64) * K
        # "layernorm": ROWS divides ROWS_PER_BATCH (kernel_meta), so a program's rows share one
        # batch (the other prologues do not use it).
        batch = (tl.program_id(0) * ROWS // ROWS_PER_BATCH).to(tl.int64)
        cols = tl.arange(0, CHUNK)
        mean = tl.zeros([ROWS], tl.float32)
        rstd = tl.full([ROWS], 1.0, tl.float32)
        if PROLOGUE == 1:  # two-pass variance, as fpsa_jax.model.norms.layer_norm
            total = tl.zeros([ROWS, CHUNK], tl.float32)
            for start in range(0, K, CHUNK):
                inside = row_ok[:, None] & (start + cols < K)[None, :]
                offs = base[:, None] + start + cols[None, :]
                total += tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
            mean = tl.math.div_rn(tl.sum(total, axis=1), K)
            total = tl.zeros([ROWS, CHUNK], tl.float32)
            for start in range(0, K, CHUNK):
                inside = row_ok[:, None] & (start + cols < K)[None, :]
                x = tl.load(x_ptr + base[:, None] + start + cols[None, :], mask=inside, other=0.0)
                centred = tl.where(inside, x.to(tl.float32) - mean[:, None], 0.0)
                total += centred * centred
            var = tl.math.div_rn(tl.sum(total, axis=1), K)
            rstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + EPS))

        peak = tl.zeros([ROWS, CHUNK], tl.float32)
        need_walk = tl.full([ROWS], 1, tl.int1)  # rows whose absmax the walk below must find
        if PROLOGUE == 2 and GELU_ABSMAX == 1:
            # max u over the finite u (exactly the u whose GELU is finite), per lane; GELU of
            # each lane's max, so the row's largest is GELU(max u) (GELU is increasing there).
            top = tl.full([ROWS, CHUNK], float("-inf"), tl.float32)
            for start in range(0, K, CHUNK):
                offs = start + cols
                col_ok = offs < K
                u = gelu_input(x_ptr, a_ptr, b_ptr, c_ptr, rows, base, offs, row_ok, col_ok)
                finite = col_ok[None, :] & (u == u) & (tl.abs(u) < float("inf"))
                top = tl.maximum(top, tl.where(finite, u, float("-inf")))
            largest = tl.max(tl.where(top > float("-inf"), gelu_tanh(top), 0.0), axis=1)
            known = largest >= GELU_FLOOR  # else a negative GELU may be the larger magnitude
            peak += tl.where(known, largest, 0.0)[:, None]
            need_walk = ~known
        walk = tl.max(need_walk.to(tl.int32), axis=0) > 0

        scale = tl.full([ROWS], 1.0, tl.float32)
        inverse = tl.full([ROWS], 1.0, tl.float32)
        # Phase 0 finds the absmax, phase 1 writes; one body, unrolled twice at compile time.
        # (A runtime `if` rather than a loop bound: the interpreter wants Python ints there.)
        for phase in tl.static_range(2):
            run = True
            if phase == 0:
                run = walk
            else:
                absmax = tl.max(peak, axis=1)
                scale = tl.where(absmax > 0.0, absmax / 448.0, 1.0)  # E4M3's largest finite
                inverse = tl.math.div_rn(1.0, scale)
            if run:
                for start in range(0, K, CHUNK):
                    offs = start + cols
                    col_ok = offs < K
                    inside = row_ok[:, None] & col_ok[None, :]
                    if PROLOGUE == 2:
                        u = gelu_input(x_ptr, a_ptr, b_ptr, c_ptr, rows, base, offs, row_ok, col_ok)
                        y = gelu_tanh(u)
                    else:
                        x = tl.load(x_ptr + base[:, None] + offs[None, :], mask=inside, other=0.0)
                        x = x.to(tl.float32)
                        if PROLOGUE == 1:
                            mul = tl.load(a_ptr + batch * K + offs, mask=col_ok, other=0.0)
                            add = tl.load(b_ptr + batch * K + offs, mask=col_ok, other=0.0)
                            y = (x - mean[:, None]) * rstd[:, None] * mul[None, :] + add[None, :]
                        else:
                            y = x
                    if phase == 0:
                        finite = need_walk[:, None] & inside & (y == y) & (tl.abs(y) < float("inf"))
                        peak = tl.maximum(peak, tl.where(finite, tl.abs(y), 0.0))
                    else:
                        # Saturate first: a value just above 448 (float32 round-off) or an inf must
                        # not cast to NaN, E4M3's infinity. NaN stays NaN (min/max propagate it).
                        q = tl.maximum(
                            y * inverse[:, None], -448.0, propagate_nan=tl.PropagateNan.ALL
                        )
                        q = tl.minimum(q, 448.0, propagate_nan=tl.PropagateNan.ALL)
                        q = q.to(out_ptr.dtype.element_ty)
                        tl.store(out_ptr + base[:, None] + offs[None, :], q, mask=inside)
        tl.store(scale_ptr + rows, scale, mask=row_ok)

    return row_quant_kernel


kernel = functools.cache(make_kernel)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


def kernel_meta(
    rows: int,
    k: int,
    prologue: str,
    *,
    rows_per_batch: int = 1,
    eps: float = 0.0,
    gelu_absmax: str = "from_max",
    rows_per_program: int = ROWS_PER_PROGRAM,
    chunk=CHUNK,
):
    """The kernel's constexpr arguments, grid and warp count for an [rows, k] input.

    `rows_per_program` (1, 2, 4 or 8) rows share a program and its loads of the per-column
    operands; for "layernorm" it is halved until it divides `rows_per_batch`.
    """
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue must be one of {list(PROLOGUES)}, got {prologue!r}")
    if gelu_absmax not in GELU_ABSMAX:
        raise ValueError(f"gelu_absmax must be one of {list(GELU_ABSMAX)}, got {gelu_absmax!r}")
    if rows_per_program not in (1, 2, 4, 8):
        raise ValueError(f"rows_per_program must be 1, 2, 4 or 8, got {rows_per_program}")
    if k > MAX_ROW:
        raise ValueError(f"rows of {k} values exceed the kernel's {MAX_ROW}")
    if rows < 1 or rows % rows_per_batch:
        raise ValueError(f"{rows} rows do not split into batches of {rows_per_batch}")
    per_program = rows_per_program
    while prologue == "layernorm" and rows_per_batch % per_program:
        per_program //= 2
    meta = dict(
        M=rows,
        K=k,
        ROWS=per_program,
        ROWS_PER_BATCH=rows_per_batch,
        EPS=float(eps),
        PROLOGUE=PROLOGUES[prologue],
        GELU_ABSMAX=GELU_ABSMAX[gelu_absmax],
        GELU_FLOOR=GELU_FLOOR,
        CHUNK=min(chunk, _next_pow2(k)),
    )
    num_warps = 4
    return dict(meta=meta, grid=(-(-rows // per_program),), num_warps=num_warps)


def quantize_rows(
    x: jax.Array,
    prologue: str = "none",
    a: jax.Array | None = None,
    b: jax.Array | None = None,
    c: jax.Array | None = None,
    *,
    eps: float = 0.0,
    gelu_absmax: str = "from_max",
    rows_per_program: int = ROWS_PER_PROGRAM,
    out_dtype=jnp.float8_e4m3fn,
) -> tuple[jax.Array, jax.Array]:
    """Runs the kernel through jax-triton.

    Args:
      x: [B, L, K] for "layernorm" (row r of batch r // L), any [..., K] otherwise.
      prologue: "none", "layernorm" (a = mul, b = add: float32 [B, K]; eps) or "gelu" (a = row
        scales [...] or [..., 1], b = column scales [K], c = bias [K]; float32).
      gelu_absmax: "from_max" (the "gelu" absmax as GELU(max u) where that decides it) or
        "walk" (GELU over the whole row): the same scales up to float32 round-off.
      rows_per_program: rows one program walks together (1, 2, 4, 8; see `kernel_meta`).
      out_dtype: float8_e4m3fn, or float32 (the saturated quotients before the cast).

    Returns:
      (values [..., K] in out_dtype, scales float32 [..., 1]).
    """
    *lead, k = x.shape
    rows = 1
    for n in lead:
        rows *= n
    operands = {"none": (), "layernorm": (a, b), "gelu": (a, b, c)}.get(prologue)
    if operands is not None and any(op is None for op in operands):
        raise ValueError(f"prologue {prologue!r} needs {len(operands)} operand arrays")
    rows_per_batch = 1
    if prologue == "layernorm":
        if x.ndim != 3 or a.shape != (x.shape[0], k) or b.shape != (x.shape[0], k):
            raise ValueError(
                f"prologue 'layernorm' takes x [B, L, K] and mul, add [B, K]; got {x.shape}, "
                f"{a.shape}, {b.shape}"
            )
        rows_per_batch = x.shape[1]
    if prologue == "gelu" and (a.size != rows or b.shape != (k,) or c.shape != (k,)):
        raise ValueError(
            f"prologue 'gelu' takes row scales of {rows} values and column scales, bias [{k}]; "
            f"got {a.shape}, {b.shape}, {c.shape}"
        )
    call = kernel_meta(
        rows,
        k,
        prologue,
        rows_per_batch=rows_per_batch,
        eps=eps,
        gelu_absmax=gelu_absmax,
        rows_per_program=rows_per_program,
    )
    unused = jnp.zeros((1,), jnp.float32)  # a placeholder pointer the kernel never reads
    a, b, c = (unused if op is None else op.astype(jnp.float32).reshape(-1) for op in (a, b, c))
    import jax_triton as jt  # after the checks: they need no GPU

    values, scales = jt.triton_call(
        x.reshape(rows, k),
        a,
        b,
        c,
        kernel=kernel(),
        out_shape=(
            jax.ShapeDtypeStruct((rows, k), out_dtype),
            jax.ShapeDtypeStruct((rows,), jnp.float32),
        ),
        grid=call["grid"],
        num_warps=call["num_warps"],
        num_stages=1,
        name=f"fp8_row_quant_{prologue}",
        **call["meta"],
    )
    return values.reshape(*lead, k), scales.reshape(*lead, 1)
