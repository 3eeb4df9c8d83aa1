"""Position, time and text-length helpers of the Wan2.1 DiT (pure functions).

Static tables (RoPE angles, which depend only on the token grid) are built on the host in float64
NumPy, as the original does, and enter the graph as float32 constants.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


def sinusoidal_embedding(timesteps: jnp.ndarray, dim: int) -> jnp.ndarray:
    """Wan's timestep embedding: [cos, sin] of t * 10000^(-i/half), i < half = dim / 2.

    timesteps: [B] in Wan's 0..1000 scale. Returns [B, dim] float32. The frequencies are exact
    float64 constants rounded once; the products run in float32 (the original uses float64,
    which JAX only has with x64 enabled).
    """
    half = dim // 2
    freqs = np.power(10000.0, -np.arange(half, dtype=np.float64) / half).astype(np.float32)
    angles = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


@functools.lru_cache(maxsize=32)
def rope_tables(
    grid: tuple[int, int, int], rope_dims: tuple[int, int, int], theta: float = 10000.0
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of the 3D RoPE angles for every token of a (T, H, W) grid.

    rope_dims: real channels rotated by the t, h and w position (e.g. 44/42/42 of 128); axis a
    uses inv_freq = 1 / theta^(arange(0, d_a, 2) / d_a). Returns two [L, D/2] float32 arrays,
    tokens in row-major (t, h, w) order, channel pairs in (t, h, w) order.
    """
    parts = []
    for axis, (size, d) in enumerate(zip(grid, rope_dims, strict=True)):
        inv_freq = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        angle = np.arange(size, dtype=np.float64)[:, None] * inv_freq[None, :]  # [size, d/2]
        shape = [1, 1, 1, d // 2]
        shape[axis] = size
        parts.append(np.broadcast_to(angle.reshape(shape), (*grid, d // 2)))
    angles = np.concatenate(parts, axis=-1).reshape(int(np.prod(grid)), -1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate adjacent channel pairs (x[2i], x[2i+1]) by the per-token angles.

    x: [B, L, N, D]; cos, sin: [L, D/2]. Computed and returned in float32.
    """
    b, seq, n, d = x.shape
    pairs = x.astype(jnp.float32).reshape(b, seq, n, d // 2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(b, seq, n, d)


def fit_text_length(context: jnp.ndarray, text_len: int) -> jnp.ndarray:
    """Zero-pad or cut [B, Lt, text_dim] text embeddings to [B, text_len, text_dim].

    Wan cuts each prompt's embedding to its true length and zero-pads to text_len; callers pass
    embeddings already cut (or zero beyond the true length), so padding with zeros matches.
    """
    length = context.shape[1]
    if length >= text_len:
        return context[:, :text_len]
    return jnp.pad(context, ((0, 0), (0, text_len - length), (0, 0)))
