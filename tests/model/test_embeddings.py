"""RoPE, timestep embedding and text padding against independent float64 NumPy computations."""

import jax.numpy as jnp
import numpy as np
import pytest

from fpsa_jax.model.embeddings import apply_rope, fit_text_length, rope_tables, sinusoidal_embedding


def _rope_numpy(x, grid, head_dim):
    """Wan's rope_apply, written from its description with complex128 numbers."""
    c = head_dim // 2
    split = (c - 2 * (c // 3), c // 3, c // 3)
    dims = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    assert tuple(2 * s for s in split) == dims
    freqs = []
    for d in dims:
        inv = 1.0 / np.power(10000.0, np.arange(0, d, 2, dtype=np.float64) / d)
        freqs.append(np.exp(1j * np.outer(np.arange(1024), inv)))
    t, h, w = grid
    per_token = np.concatenate(
        [
            np.broadcast_to(freqs[0][:t, None, None, :], (t, h, w, split[0])),
            np.broadcast_to(freqs[1][None, :h, None, :], (t, h, w, split[1])),
            np.broadcast_to(freqs[2][None, None, :w, :], (t, h, w, split[2])),
        ],
        axis=-1,
    ).reshape(t * h * w, 1, c)
    xc = x.astype(np.float64).reshape(*x.shape[:-1], c, 2)
    xc = xc[..., 0] + 1j * xc[..., 1]
    out = xc * per_token[None]
    return np.stack([out.real, out.imag], axis=-1).reshape(x.shape)


@pytest.mark.parametrize("grid,head_dim", [((3, 5, 7), 12), ((2, 1, 9), 128), ((1, 4, 3), 64)])
def test_rope_matches_complex_rotation_in_float64(grid, head_dim):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, int(np.prod(grid)), 3, head_dim)).astype(np.float32)
    dims = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    cos, sin = rope_tables(grid, dims)
    out = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    ref = _rope_numpy(x, grid, head_dim)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def test_rope_leaves_the_first_token_unrotated():
    x = np.random.default_rng(1).standard_normal((1, 6, 2, 12)).astype(np.float32)
    cos, sin = rope_tables((1, 2, 3), (4, 4, 4))
    out = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    np.testing.assert_array_equal(out[:, 0], x[:, 0])


def test_timestep_embedding_matches_float64_formula():
    t = np.array([0.0, 1.0, 41.5, 500.25, 999.0])
    dim = 256
    half = dim // 2
    angles = np.outer(t, np.power(10000.0, -np.arange(half) / half))
    ref = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)
    out = np.asarray(sinusoidal_embedding(jnp.asarray(t, jnp.float32), dim))
    # float32 angles up to 1000 rad carry ~1000 * 2^-24 = 6e-5 absolute rounding.
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)
    assert out.dtype == np.float32


@pytest.mark.parametrize("length", [1, 7, 32, 40])
def test_text_is_zero_padded_or_cut_to_text_len(length):
    ctx = np.random.default_rng(2).standard_normal((2, length, 5)).astype(np.float32)
    out = np.asarray(fit_text_length(jnp.asarray(ctx), 32))
    ref = np.zeros((2, 32, 5), np.float32)
    ref[:, : min(length, 32)] = ctx[:, :32]
    np.testing.assert_array_equal(out, ref)
