"""impl="triton": FPSA attention through the Hopper Triton kernels, differentiable.

Forward: the pre-pass (`kernel_layout.quantize_for_kernel` with the Triton pre-pass kernel: tile
reorder, FP8 values, V transposed; the scales are small XLA reductions) feeds
`pallas_kernels.triton_fpsa_fwd`, the FP8 block-sparse kernel, which walks each query tile's
list of key blocks holding a real token (`kernel_layout.key_block_list`: with valid-first slots the
all-padding blocks of edge tiles drop out) and writes its output straight back in token order.

Backward (`jax.custom_vjp`): quantization is straight-through (DESIGN.md section 3), so the
gradient is that of attention evaluated at the quantized Q_hat, K_hat, V_hat, with the forward's
output O and log-sum-exp. It runs in 16-bit on the dequantized values Q_hat, K_hat, V_hat (one
XLA fusion from the FP8 residuals) rather than on bf16 copies of the inputs: that is the point
where the forward was evaluated, so P rebuilt from the forward's lse sums to one up to rounding,
and the residuals stay FP8 (half the memory of bf16 copies). P and dS go to the matmuls in bf16
(the FP8 rounding of P is straight-through too). Two block-sparse kernels
(`pallas_kernels.triton_fpsa_bwd`): dQ over the forward's key-tile list, dK/dV over the transposed
list. Masked pairs get exactly zero gradient. The backward still walks every key block of the
listed tiles (all-padding ones are masked by key_bias, at full cost): skipping them there too is
left for later.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from fpsa_jax.attention.config import FPSAConfig
from fpsa_jax.attention.device import require_hopper
from fpsa_jax.attention.kernel_layout import (
    from_kernel_layout,
    key_block_list,
    quantize_for_kernel,
    slot_tokens,
    to_kernel_layout,
)
from fpsa_jax.attention.mask import build_mask_info
from pallas_kernels.triton_fpsa_bwd import fpsa_backward
from pallas_kernels.triton_fpsa_fwd import BLOCK_N, fpsa_forward


def _check(dtype, d: int, config: FPSAConfig | None) -> None:
    if config is None:
        raise ValueError(
            "impl='triton' needs an FPSAConfig (its tile sets the kernel layout); for dense "
            "unquantized attention use impl='cudnn' or impl='xla'."
        )
    if config.quant == "none" and jnp.dtype(dtype) not in (
        jnp.dtype(jnp.bfloat16),
        jnp.dtype(jnp.float16),
    ):
        raise NotImplementedError(
            f"impl='triton' with quant='none' runs 16-bit operands only, got {dtype}; use "
            f"quant='fp8', bf16/fp16 inputs, or impl='xla'."
        )
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"impl='triton' needs a power-of-two head dim D in [16, 256], got {d}")
    if config.quant == "fp8" and d < 32:
        raise ValueError(f"impl='triton' with FP8 needs a head dim D >= 32 (FP8 dots), got {d}")


def _forward(q, k, v, grid, config: FPSAConfig, scale: float):
    """(o [B, L, N, D], residuals for the backward)."""
    ops = quantize_for_kernel(q, k, v, grid, config, block_n=BLOCK_N, prepass="triton_scales")
    blocks = key_block_list(grid, config.tile, config.window, ops.padded_tile, BLOCK_N)
    o, lse = fpsa_forward(
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
        slot_token=slot_tokens(grid, config.tile, ops.padded_tile),
    )
    return o, (ops, o, lse)


def block_sparse_backward(grid, config: FPSAConfig, scale: float, residuals, g):
    """The custom_vjp backward of every Hopper forward that saves (ops, o, lse2): `KernelOperands`,
    the output [B, L, N, D] in token order and the base-2 log-sum-exp [B, N, Lp]."""
    ops, o, lse = residuals
    info = build_mask_info(grid, config.tile, config.window)
    dtype = jnp.float16 if g.dtype == jnp.float16 else jnp.bfloat16
    pp = ops.padded_tile
    q_hat, k_hat, v_hat = ops.dequantized(dtype)
    do = to_kernel_layout(g, grid, config.tile, pp)  # padded rows zero, as the kernels need
    # delta = rowsum(dO * O), in token order, then into the kernel layout ([B, N, Lp]).
    delta = jnp.sum(g.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    delta = to_kernel_layout(delta, grid, config.tile, pp)[..., 0]
    grads = fpsa_backward(
        q_hat,
        k_hat,
        v_hat,
        do.astype(dtype),
        lse,
        delta,
        ops.key_bias,
        info.kv_tiles,
        info.q_tiles,
        info.q_count,
        padded_tile=pp,
        scale=scale,
    )
    return tuple(from_kernel_layout(x, grid, config.tile, pp).astype(g.dtype) for x in grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q, k, v, grid, config, scale):
    return _forward(q, k, v, grid, config, scale)[0]


_attention.defvjp(_forward, block_sparse_backward)


def _require_hopper() -> None:
    require_hopper("triton")
    try:
        import jax_triton  # noqa: F401
    except ImportError as e:
        raise ValueError("impl='triton' needs jax-triton 0.3.1: pip install 'fpsa-jax[gpu]'") from e


def kernel_supports(dtype, head_dim: int, config: FPSAConfig | None) -> bool:
    """Whether impl='triton' runs these inputs in this process (impl='auto' asks, as for mosaic)."""
    try:
        _check(dtype, head_dim, config)
        _require_hopper()
    except (ValueError, NotImplementedError):
        return False
    return True


def triton_attention(q, k, v, *, grid, config: FPSAConfig | None, scale) -> jax.Array:
    """FPSA attention with the Triton kernels. q, k, v: [B, L, N, D] -> [B, L, N, D] in q's dtype.

    Needs a Hopper GPU and jax-triton. `config.window` None means every key tile. Differentiable
    (straight-through quantization; see the module docstring).
    """
    _check(q.dtype, q.shape[-1], config)
    grid = tuple(int(g) for g in grid)
    if math.prod(grid) != q.shape[1]:
        raise ValueError(f"grid {grid} has {math.prod(grid)} tokens but L = {q.shape[1]}")
    _require_hopper()
    return _attention(q, k, v, grid, config, float(scale))
