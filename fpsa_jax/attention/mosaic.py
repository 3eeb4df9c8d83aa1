"""impl="mosaic": FPSA attention through the Pallas Mosaic GPU forward, differentiable.

Forward: the one pre-pass (`kernel_layout.quantize_for_kernel`: tile reorder, FP8 values and
scales, V transposed; values written by the Triton pre-pass kernel where jax-triton is installed,
else by XLA, the same bits either way) feeds `pallas_kernels.mosaic_fpsa_fwd`, the
warp-specialized FP8 block-sparse kernel. Like impl="triton" it walks, per query tile, only the key
blocks holding a real token (`kernel_layout.key_block_list`, 64-slot blocks). On the GPU the
kernel stores its output in token order itself (the `slot_tokens` table); in the interpreter it
writes the kernel layout and `kernel_layout.output_from_kernel` reorders it.

Backward: the Triton bf16 block-sparse kernels (`triton.block_sparse_backward`) on this forward's
residuals (operands, output, base-2 log-sum-exp), until a Mosaic backward beats them; so
differentiating needs jax-triton as well.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from fpsa_jax.attention.config import FPSAConfig
from fpsa_jax.attention.device import require_hopper
from fpsa_jax.attention.kernel_layout import (
    key_block_list,
    key_block_valid_slots,
    output_from_kernel,
    quantize_for_kernel,
    slot_tokens,
)
from fpsa_jax.attention.triton import block_sparse_backward
from pallas_kernels.mosaic_fpsa_fwd import (
    BLOCK_KV,
    BLOCK_Q,
    HEAD_DIMS,
    MAX_CONSUMERS,
    MosaicLaunch,
    fpsa_forward,
)


def check_supported(dtype, head_dim: int, config: FPSAConfig | None) -> None:
    """Raises ValueError (or NotImplementedError) saying why the kernel cannot take these inputs."""
    if config is None:
        raise ValueError(
            "impl='mosaic' needs an FPSAConfig (its tile sets the kernel layout); for dense "
            "unquantized attention use impl='cudnn' or impl='xla'."
        )
    if config.quant == "none" and jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
        raise NotImplementedError(
            f"impl='mosaic' with quant='none' runs bf16 operands only, got {dtype}; use "
            f"quant='fp8', bf16 inputs, or impl='xla'."
        )
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"impl='mosaic' needs a head dim D in {HEAD_DIMS}, got {head_dim}")
    if math.prod(config.tile) > MAX_CONSUMERS * BLOCK_Q:
        raise ValueError(
            f"impl='mosaic' takes tiles of up to {MAX_CONSUMERS * BLOCK_Q} tokens, got "
            f"{config.tile} ({math.prod(config.tile)} tokens); use impl='triton' or 'xla'."
        )


def _forward(q, k, v, grid, config: FPSAConfig, scale: float, launch, interpret: bool):
    """(o [B, L, N, D], residuals for the backward)."""
    prepass = "xla" if interpret or not _has_jax_triton() else "triton_scales"
    ops = quantize_for_kernel(q, k, v, grid, config, block_n=BLOCK_KV, prepass=prepass)
    blocks = key_block_list(grid, config.tile, config.window, ops.padded_tile, BLOCK_KV)
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
        valid_slots=key_block_valid_slots(grid, config.tile, ops.padded_tile, BLOCK_KV),
        slot_token=None if interpret else slot_tokens(grid, config.tile, ops.padded_tile),
        launch=launch,
        interpret=interpret,
    )
    if interpret:  # the interpreter cannot run the token-order store: reorder after it
        o = output_from_kernel(o, ops)
    return o, (ops, o, lse)


def _backward(grid, config, scale, launch, interpret, residuals, g):
    if interpret or not _has_jax_triton():
        raise ValueError(
            "impl='mosaic' is differentiated by the Triton backward kernels, which need a Hopper "
            "GPU with jax-triton 0.3.1 (pip install 'fpsa-jax[gpu]')."
        )
    return block_sparse_backward(grid, config, scale, residuals, g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _attention(q, k, v, grid, config, scale, launch, interpret):
    return _forward(q, k, v, grid, config, scale, launch, interpret)[0]


_attention.defvjp(_forward, _backward)


def _has_jax_triton() -> bool:
    try:
        import jax_triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_supports(dtype, head_dim: int, config: FPSAConfig | None) -> bool:
    """Whether impl='mosaic' runs these inputs in this process (impl='auto' asks it)."""
    try:
        check_supported(dtype, head_dim, config)
        require_hopper("mosaic")
    except (ValueError, NotImplementedError):
        return False
    return True


def mosaic_attention(
    q,
    k,
    v,
    *,
    grid,
    config: FPSAConfig | None,
    scale,
    launch: MosaicLaunch | None = None,
    interpret: bool = False,
) -> jax.Array:
    """FPSA attention with the Mosaic GPU forward: q, k, v [B, L, N, D] -> [B, L, N, D], q dtype.

    Needs a Hopper GPU, or `interpret=True` (Mosaic GPU's interpreter, any backend, forward only).
    Differentiable on the GPU through the Triton backward (see the module docstring).
    `launch` overrides the kernel's pipeline depth and register split (benchmarks).
    """
    check_supported(q.dtype, q.shape[-1], config)
    grid = tuple(int(g) for g in grid)
    if math.prod(grid) != q.shape[1]:
        raise ValueError(f"grid {grid} has {math.prod(grid)} tokens but L = {q.shape[1]}")
    if not interpret:
        require_hopper("mosaic")
    return _attention(q, k, v, grid, config, float(scale), launch, bool(interpret))
