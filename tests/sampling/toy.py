"""A smooth, nonlinear toy velocity field shared by the sampling tests (NumPy and JAX)."""

from __future__ import annotations

import numpy as np

C, D = 4, 6  # latent channels, text width
_M = np.random.default_rng(7).normal(size=(C, C)) / np.sqrt(C)


def attention_gain(attention) -> float:
    """A per-config factor, so a step run with the wrong FPSAConfig changes the result."""
    if attention is None:
        return 1.0
    return 1.0 + 0.01 * sum(attention.window or (0,)) + 0.001 * sum(attention.tile)


def toy_velocity(xp, x, t, context, attention):
    """v [B, F, H, W, C] from x [B, F, H, W, C], t [B], context [B, Lt, D] (xp = np or jnp)."""
    scale = (1.0 + t / 1000.0)[:, None, None, None, None]
    bias = context.mean(axis=1)[:, None, None, None, :C]
    return attention_gain(attention) * (xp.tanh(x @ xp.asarray(_M, x.dtype)) * scale + bias)


def inputs(batch=1, shape=(2, 3, 4), lt=5, seed=0):
    """(noise [B, F, H, W, C], context [B, Lt, D], negative [B, Lt, D]) float32."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(batch, *shape, C)).astype(np.float32)
    ctx = rng.normal(size=(batch, lt, D)).astype(np.float32)
    neg = rng.normal(size=(batch, lt, D)).astype(np.float32)
    return noise, ctx, neg


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
