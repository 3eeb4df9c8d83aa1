"""Shared oracles, strategies and the behaviour suite every FPSA implementation must pass.

Kept independent of the library's own index code: the brute-force masks below loop over tiles in
plain Python so that they check, rather than repeat, `fpsa_jax.attention.tiling` / `mask`.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from fpsa_jax.attention import FPSAConfig, fpsa_attention

# ----------------------------------------------------------------------------- strategies

axis = st.integers(1, 6)
grids = st.tuples(axis, axis, axis)
tiles = st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4))
windows = st.none() | st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4))
groups = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))


QUANTS = st.sampled_from(["none", "fp8"])


@st.composite
def configs(draw, quant=QUANTS):
    return FPSAConfig(
        tile=draw(tiles),
        window=draw(windows),
        quant=draw(quant),
        q_group=draw(groups),
        k_group=draw(groups),
    )


# ----------------------------------------------------------------------------- oracles


def brute_window_start(u, n, omega):
    """The window rule for one axis, literally as DESIGN.md states it."""
    w = min(omega, n)
    return w, min(max(u - (w - 1) // 2, 0), n - w)


@functools.lru_cache(maxsize=64)
def brute_tile_mask(grid, tile, window):
    """bool [n_tiles, n_tiles] by nested loops over 3D tile coordinates (row-major numbering)."""
    n = [math.ceil(g / t) for g, t in zip(grid, tile, strict=True)]
    coords = list(itertools.product(range(n[0]), range(n[1]), range(n[2])))
    mask = np.zeros((len(coords), len(coords)), dtype=bool)
    for i, u in enumerate(coords):
        for j, v in enumerate(coords):
            ok = True
            if window is not None:
                for a in range(3):
                    w, start = brute_window_start(u[a], n[a], window[a])
                    ok &= start <= v[a] < start + w
            mask[i, j] = ok
    return mask


def brute_token_mask(grid, tile, window):
    """bool [L, L] in token order from `brute_tile_mask`."""
    n = [math.ceil(g / t) for g, t in zip(grid, tile, strict=True)]
    tok = [
        ((t // tile[0]) * n[1] + h // tile[1]) * n[2] + w // tile[2]
        for t, h, w in itertools.product(*(range(g) for g in grid))
    ]
    tok = np.array(tok)
    return brute_tile_mask(tuple(grid), tuple(tile), window)[tok[:, None], tok[None, :]]


def numpy_attention(q, k, v, scale, mask=None):
    """Masked softmax attention in float64 NumPy; q, k, v [B, L, N, D]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("bqnd,bknd->bnqk", q, k) * scale
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnqk,bknd->bqnd", p, v)


def random_qkv(seed, shape, dtype=jnp.float32, std=1.0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return tuple((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype) for k in ks)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


# float32 with HIGHEST-precision dots against float64: the error is a few float32 ulps
# (2^-24 = 6e-8) times the reduction lengths (L <= 216 here, D = 8), comfortably below 1e-5.
F32_RTOL = 1e-5


@functools.partial(jax.jit, static_argnames=("grid", "config", "impl"))
def jit_attention(q, k, v, grid, config, impl):
    return fpsa_attention(q, k, v, grid=grid, config=config, impl=impl)


# ----------------------------------------------------------------------------- shared suite


class AttentionBehaviour:
    """Behaviour every implementation serving windows must show; subclasses set `impl` (and
    `differentiable = False` for forward-only kernels, which skips the gradient tests)."""

    impl: str
    differentiable: bool = True

    # Subclasses differ only in `impl`, so sharing the example database between them is harmless.
    @settings(max_examples=20, suppress_health_check=[HealthCheck.differing_executors])
    @given(grid=grids, config=configs(quant=st.just("none")), seed=st.integers(0, 2**16))
    def test_matches_float64_masked_softmax(self, grid, config, seed):
        q, k, v = random_qkv(seed, (1, math.prod(grid), 2, 8))
        out = jit_attention(q, k, v, grid, config, self.impl)
        want = numpy_attention(q, k, v, 8**-0.5, brute_token_mask(grid, config.tile, config.window))
        assert out.dtype == jnp.float32
        assert rel_err(out, want) <= F32_RTOL

    def test_dense_config_none_matches_float64_softmax(self):
        grid = (2, 3, 5)
        q, k, v = random_qkv(1, (2, 30, 3, 16))
        out = jit_attention(q, k, v, grid, None, self.impl)
        assert rel_err(out, numpy_attention(q, k, v, 0.25)) <= F32_RTOL

    def test_output_dtype_follows_q(self):
        q, k, v = random_qkv(2, (1, 24, 2, 8), dtype=jnp.bfloat16)
        cfg = FPSAConfig(tile=(2, 2, 2), window=(1, 2, 2), quant="fp8")
        out = jit_attention(q, k, v, (2, 3, 4), cfg, self.impl)
        assert out.dtype == jnp.bfloat16 and out.shape == q.shape
        want = numpy_attention(q, k, v, 8**-0.5, brute_token_mask((2, 3, 4), (2, 2, 2), (1, 2, 2)))
        assert rel_err(out, want) < 0.1  # bf16 inputs + FP8: a coarse sanity check only

    def test_gradients_match_finite_differences(self):
        if not self.differentiable:
            pytest.skip(f"impl={self.impl!r} has no backward")
        # float64 so that central differences (eps ~ 1e-3..1e-6) resolve gradients to ~1e-6.
        grid, cfg = (3, 2, 3), FPSAConfig(tile=(2, 2, 2), window=(1, 1, 2))
        with jax.enable_x64(True):
            q, k, v = (x.astype(jnp.float64) for x in random_qkv(3, (1, 18, 2, 4)))
            f = lambda q, k, v: fpsa_attention(q, k, v, grid=grid, config=cfg, impl=self.impl)
            check_grads(f, (q, k, v), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)

    def test_masked_pairs_get_zero_gradient(self):
        if not self.differentiable:
            pytest.skip(f"impl={self.impl!r} has no backward")
        # Sparsity is exact: a key outside every window of query i does not affect o_i.
        grid, cfg = (1, 1, 8), FPSAConfig(tile=(1, 1, 2), window=(1, 1, 1))
        q, k, v = random_qkv(4, (1, 8, 1, 4))
        f = lambda k, v: fpsa_attention(q, k, v, grid=grid, config=cfg, impl=self.impl)[0, 0].sum()
        dk, dv = jax.grad(f, argnums=(0, 1))(k, v)
        assert np.all(np.asarray(dk[0, 2:]) == 0) and np.all(np.asarray(dv[0, 2:]) == 0)
        assert np.any(np.asarray(dv[0, :2]) != 0)
