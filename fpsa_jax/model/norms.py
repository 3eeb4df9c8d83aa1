"""The Wan DiT's norms, as it computes them (float32 statistics).

`layer_norm` is shared by the blocks, the head and the FP8 linears' fused norm-and-quantize
(`fp8_linear.quantize_normed_tokens`); `rms_norm` is the q/k norm of the attention, with the
self-attention's RoPE rotation after it, written by XLA or in one Triton pass per token
(`triton_passes`, `pallas_kernels.triton_rms_rope`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fpsa_jax.model import triton_passes
from fpsa_jax.model.embeddings import apply_rope
from fpsa_jax.model.pending_linear import PendingLinear

Array = jax.Array
RopeTables = tuple[Any, Any]  # cos, sin: [L, D/2] float32 (embeddings.rope_tables)


def layer_norm(x: Array, eps: float) -> Array:
    """LayerNorm without affine over the last axis, in float32 (two-pass variance)."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def rms_norm(
    x: Array | PendingLinear,
    scale: Array,
    eps: float,
    rope: RopeTables | None = None,
    *,
    head_dim: int | None = None,
    out_dtype: Any = jnp.float32,
    writer: triton_passes.Writer = "auto",
) -> Array:
    """Wan's RMSNorm over the last axis, optionally followed by RoPE, in `out_dtype`.

        n = round_to(x.dtype, x * rsqrt(mean(x^2) + eps)) * scale          (float32)
        with rope: each head's channel pairs (n[2i], n[2i+1]) rotated by the token's angles

    The normalised value is rounded to x's dtype before the float32 weight, as in the original.

    Args:
      x: [..., DIM]; with rope [B, L, DIM], DIM = N * head_dim. Or a linear's `PendingLinear`
        output (x = its value()), whose epilogue the Triton pass then applies on the way in.
      scale: [DIM], the learned weight.
      rope: (cos, sin) [L, head_dim / 2] (`embeddings.rope_tables`), or None.
      head_dim: D, needed with rope.
      out_dtype: the result's dtype (RoPE and the weight run in float32 either way).
      writer: "xla" the jnp functions, "triton" one pass per token
        (`pallas_kernels.triton_rms_rope`; its gradient is the jnp functions'), "auto" triton
        where it can run (`triton_passes.triton_support`).

    Returns:
      x's shape in out_dtype.
    """
    if rope is not None and (head_dim is None or len(x.shape) != 3):
        raise ValueError(f"RoPE after the norm needs x [B, L, DIM] and head_dim, got {x.shape}")
    pending = x if isinstance(x, PendingLinear) else PendingLinear(x, None)
    if not triton_passes.use_triton(writer, _triton_support(x.shape[-1]), "RMSNorm"):
        return _rms_norm_xla(pending.value(), scale, eps, rope, head_dim, out_dtype)
    if pending.bias is not None and pending.acc.dtype != jnp.dtype(pending.dtype):
        # float32 sums of a bfloat16 linear (FP8 "emulated"): its rounding is XLA's to do
        pending = PendingLinear(pending.value(), None)

    from pallas_kernels import triton_rms_rope

    cos, sin = rope if rope is not None else (None, None)

    def kernel(p, scale):
        return triton_rms_rope.rms_norm_rope(
            p.acc,
            scale,
            eps,
            cos,
            sin,
            bias=p.bias,
            row_scale=p.row_scale,
            col_scale=p.col_scale,
            head_dim=head_dim or 2,
            out_dtype=out_dtype,
        )

    def definition(p, scale):
        return _rms_norm_xla(p.value(), scale, eps, rope, head_dim, out_dtype)

    # The kernel has no gradient of its own: the backward differentiates the definition.
    fused = jax.custom_vjp(kernel)
    fused.defvjp(
        lambda p, scale: (kernel(p, scale), (p, scale)),
        lambda res, g: jax.vjp(definition, *res)[1](g),
    )
    with jax.named_scope("rms_norm_rope"):  # how benchmarks/layer_profile.py finds it
        return fused(pending, scale)


def _triton_support(dim: int) -> str | None:
    from pallas_kernels import triton_rms_rope

    if dim > triton_rms_rope.MAX_ROW:
        return f"rows of {dim} values exceed the kernel's {triton_rms_rope.MAX_ROW}"
    return triton_passes.triton_support()


def _rms_norm_xla(x, scale, eps, rope, head_dim, out_dtype):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + eps)
    y = normed.astype(x.dtype).astype(jnp.float32) * scale.astype(jnp.float32)
    if rope is not None:
        b, length, dim = x.shape
        y = apply_rope(y.reshape(b, length, dim // head_dim, head_dim), *rope).reshape(x.shape)
    return y.astype(out_dtype)
