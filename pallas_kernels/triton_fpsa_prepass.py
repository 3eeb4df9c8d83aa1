"""The FPSA kernels' pre-pass as one Triton kernel: tile reorder, scale, FP8 cast, V transpose.

Arrays only, like the other modules here: the caller computes the scales and the slot table
(`fpsa_jax.attention.kernel_layout`), this kernel moves and casts the values.

Each program copies BLOCK_P slots of one (batch, head): it gathers the slots' tokens from x
[B, L, N, D] (token order; one D-long row per slot, 2 * D contiguous bytes for bf16), divides by
the scale, saturates to +-448 and casts to E4M3 (round to nearest even, as Hopper's
`cvt.rn.satfinite` does), then stores either row major into [B, N, Lp, D] (Q, K) or transposed
into [B, N, D, Lp] (V).
Padded slots (table entry -1) are written as zeros, so the output needs no prior fill.

  scale_mode "tile":    scale [B, N, n_tiles], one per slot's tile (Q, K per tile group)
  scale_mode "channel": scale [B, N, D], one per channel (V)
  scale_mode "none":    values copied in x's dtype (16-bit operands, no quantization)

It reads x once and writes the output once: the XLA version of the same pass
(`kernel_layout.quantize_for_kernel` with prepass="xla") fuses the reorder with the cast but walks
x in tile order through a six-axis transpose; this kernel's reads are whole D-rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SCALE_MODES = {"none": 0, "tile": 1, "channel": 2}
BLOCK_P = 64  # slots per program; divides every padded tile length (a multiple of 64)


def make_kernel():
    """Builds the Triton kernel (Triton is imported here, so importing this module needs none)."""
    import triton
    import triton.language as tl

    @triton.jit
    def fpsa_prepass_kernel(
        x_ptr,  # [B, L, N, D], token order
        scale_ptr,  # f32 [B, N, n_tiles] ("tile"), [B, N, D] ("channel"), unused ("none")
        slot_token_ptr,  # i32 [Lp]: the token of each slot, -1 for padding
        out_ptr,  # [B, N, Lp, D], or [B, N, D, Lp] when TRANSPOSED
        SEQ: tl.constexpr,  # L
        N_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        LP: tl.constexpr,
        PP: tl.constexpr,
        SCALE_MODE: tl.constexpr,
        TRANSPOSED: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // N_HEADS
        head = bh % N_HEADS
        slots = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, HEAD_DIM)
        token = tl.load(slot_token_ptr + slots)
        valid = token >= 0

        # int64 only on the per-(batch, head) bases; offsets inside stay int32 (L * N * D < 2^31).
        x_ptr += b.to(tl.int64) * SEQ * N_HEADS * HEAD_DIM + head * HEAD_DIM
        rows = tl.where(valid, token, 0) * (N_HEADS * HEAD_DIM)
        x = tl.load(x_ptr + rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)

        if SCALE_MODE == 0:
            y = x
        else:
            if SCALE_MODE == 1:
                # BLOCK_P divides PP, so every slot of this program sits in one tile.
                scale = tl.load(scale_ptr + bh * (LP // PP) + (pid * BLOCK_P) // PP)
                y = tl.math.div_rn(x.to(tl.float32), scale)
            else:
                scale = tl.load(scale_ptr + bh * HEAD_DIM + offs_d)
                y = tl.math.div_rn(x.to(tl.float32), scale[None, :])
            # Saturate at E4M3's largest finite value first: the cast of a value just above 448
            # (float32 round-off) must not become NaN, which is what E4M3 has for infinity.
            y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        y = y.to(out_ptr.dtype.element_ty)

        out_ptr += bh.to(tl.int64) * LP * HEAD_DIM
        if TRANSPOSED:
            tl.store(out_ptr + offs_d[None, :] * LP + slots[:, None], y)
        else:
            tl.store(out_ptr + slots[:, None] * HEAD_DIM + offs_d[None, :], y)

    return fpsa_prepass_kernel


kernel = functools.cache(make_kernel)


def kernel_meta(x_shape, padded_tile: int, n_slots: int, scale_mode: str, transposed: bool):
    """The kernel's constexpr arguments and grid for x of `x_shape` [B, L, N, D]."""
    b, length, n_heads, d = x_shape
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {list(SCALE_MODES)}, got {scale_mode!r}")
    if n_slots % padded_tile or padded_tile % BLOCK_P:
        raise ValueError(
            f"the slot table ({n_slots}) must hold whole padded tiles ({padded_tile}), and the "
            f"padded tile must be a multiple of {BLOCK_P}"
        )
    if length * n_heads * d >= 2**31:
        raise ValueError(f"one batch element of x ({length} x {n_heads} x {d}) exceeds int32")
    meta = dict(
        SEQ=length,
        N_HEADS=n_heads,
        HEAD_DIM=d,
        LP=n_slots,
        PP=padded_tile,
        SCALE_MODE=SCALE_MODES[scale_mode],
        TRANSPOSED=bool(transposed),
        BLOCK_P=BLOCK_P,
    )
    return dict(meta=meta, grid=(n_slots // BLOCK_P, b * n_heads))


def relayout(
    x: jax.Array,
    scale: jax.Array | None,
    slot_token: np.ndarray,
    *,
    padded_tile: int,
    scale_mode: str,
    transposed: bool = False,
    out_dtype=jnp.float8_e4m3fn,
) -> jax.Array:
    """Runs the pre-pass kernel through jax-triton.

    Args:
      x: [B, L, N, D] in token order.
      scale: float32 [B, N, n_tiles] ("tile") or [B, N, D] ("channel"); None for "none".
      slot_token: host int32 [Lp], the token held by each slot or -1 (Lp = n_tiles * Pp).
      padded_tile: Pp. scale_mode: "tile", "channel" or "none" (then out_dtype is x's dtype).
      transposed: write [B, N, D, Lp] instead of [B, N, Lp, D].

    Returns:
      [B, N, Lp, D] (or [B, N, D, Lp]) values: E4M3 of x / scale saturated to +-448, or x itself
      for "none"; padded slots zero.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be [B, L, N, D], got shape {x.shape}")
    b, _, n_heads, d = x.shape
    slot_token = np.asarray(slot_token)
    if slot_token.ndim != 1:
        raise ValueError(f"slot_token must be a 1-D table [Lp], got shape {slot_token.shape}")
    n_slots = int(slot_token.shape[0])
    call = kernel_meta(x.shape, padded_tile, n_slots, scale_mode, transposed)
    want = {"tile": (b, n_heads, n_slots // padded_tile), "channel": (b, n_heads, d)}
    if scale_mode in want and (scale is None or tuple(scale.shape) != want[scale_mode]):
        got = None if scale is None else tuple(scale.shape)
        raise ValueError(
            f"scale_mode {scale_mode!r} needs scale of shape {want[scale_mode]}, got {got}"
        )
    if scale_mode == "none":
        out_dtype = x.dtype
        scale = jnp.zeros((1,), jnp.float32)  # a placeholder pointer; the kernel never reads it
    shape = (b, n_heads, d, n_slots) if transposed else (b, n_heads, n_slots, d)
    import jax_triton as jt  # after the checks: they need no GPU

    return jt.triton_call(
        x,
        scale.astype(jnp.float32),
        jnp.asarray(np.ascontiguousarray(slot_token, dtype=np.int32)),
        kernel=kernel(),
        out_shape=jax.ShapeDtypeStruct(shape, out_dtype),
        grid=call["grid"],
        num_warps=4,
        num_stages=1,
        name="fpsa_prepass",
        **call["meta"],
    )
