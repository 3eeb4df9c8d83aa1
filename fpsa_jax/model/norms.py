"""LayerNorm as the Wan DiT computes it (float32, two-pass variance), shared by the blocks, the head
and the FP8 linears' fused norm-and-quantize (`fp8_linear.quantize_normed_tokens`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine over the last axis, in float32 (two-pass variance)."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)
