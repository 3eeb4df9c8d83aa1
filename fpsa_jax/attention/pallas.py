"""impl="pallas": FPSA attention through the Pallas twin of the Triton kernel (Triton lowering on
GPU, interpret mode elsewhere).

The same pipeline as impl="triton": the one pre-pass (`kernel_layout.quantize_for_kernel`, its
XLA writer), the same int32 tables (`kernel_layout.key_block_list`: per query tile the key blocks
holding a real token, so all-padding blocks are skipped as in the Triton kernel; the slot table
`slot_tokens` that sends each output row to its token) and the Triton forward's argument order
(`pallas_kernels.pallas_fpsa.fpsa_forward`), with 16-bit or float32 dots and the FP8 rounding of P
done by a cast. It runs on CPU with `interpret=True`, which is how CI checks the kernel pipeline's
index logic. Forward only.

The key block pads each tile from P to Pp slots: `default_block` picks the largest of 16, 32, 64,
128 slots that pads P to within 1.25x of the least padding, e.g. P = 192 (the (3, 8, 8) tile) -> 64
(no waste; 128 would pad to 256), P = 100 -> 128, P = 27 -> 32. The rounding of P against the
running rather than the final row max is the one permitted difference from `reference_attention`
(DESIGN.md section 3).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from fpsa_jax.attention.config import FPSAConfig, validate_grid
from fpsa_jax.attention.kernel_layout import key_block_list, quantize_for_kernel, slot_tokens
from pallas_kernels.pallas_fpsa import fpsa_forward

# Tile of the one-axis token grid (1, 1, L) used for dense attention (config=None).
DENSE_TILE = 128
_BLOCK_CHOICES = (16, 32, 64, 128)


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
      block_q, block_k: query rows per program and key slots per loop step, powers of two; None
        picks `default_block(P)`.
      num_warps, num_stages: Triton launch parameters (ignored when interpreting).

    Returns:
      [B, L, N, D] in q's dtype.
    """
    g = validate_grid(grid)
    if config is None:
        g = (1, 1, math.prod(g))
        config = FPSAConfig(tile=(1, 1, min(DENSE_TILE, g[2])))
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    p_slots = math.prod(config.tile)
    return _pallas_attention(
        q,
        k,
        v,
        grid=g,
        config=config,
        scale=float(scale),
        interpret=bool(interpret),
        block_q=_check_block("block_q", block_q or default_block(p_slots)),
        block_k=_check_block("block_k", block_k or default_block(p_slots)),
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
def _pallas_attention(q, k, v, *, grid, config, scale, interpret, block_q, block_k, **launch):
    d = q.shape[-1]
    if not interpret and (d < 16 or d & (d - 1)):
        # The Triton lowering wants power-of-two dot dimensions >= 16: zero channels change no
        # dot product, and their output is dropped.
        pad = ((0, 0), (0, 0), (0, 0), (0, max(16, 1 << (d - 1).bit_length()) - d))
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    ops = quantize_for_kernel(q, k, v, grid, config, block_n=max(block_q, block_k))
    blocks = key_block_list(grid, config.tile, config.window, ops.padded_tile, block_k)
    o, _ = fpsa_forward(
        ops.q,
        ops.k,
        ops.v_t,
        ops.q_scale,
        ops.k_scale,
        ops.v_scale,
        ops.key_bias,
        blocks.blocks,
        blocks.count,
        padded_tile=ops.padded_tile,
        scale=scale,
        p_scale=config.scale if config.quant == "fp8" else 1.0,
        out_dtype=q.dtype,
        block_q=block_q,
        block_k=block_k,
        interpret=interpret,
        slot_token=slot_tokens(grid, config.tile, ops.padded_tile),
        **launch,
    )
    return o[..., :d]
