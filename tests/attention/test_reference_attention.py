"""The oracle itself: plain softmax when dense, the window rule when windowed, FP8 within bound."""

import math

import jax.numpy as jnp
import numpy as np
from fpsa_testlib import (
    AttentionBehaviour,
    brute_token_mask,
    configs,
    grids,
    jit_attention,
    numpy_attention,
    random_qkv,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from fpsa_jax.attention import FPSAConfig

E4M3_REL = 2.0**-4  # 3 mantissa bits: round-to-nearest error <= half an ulp = 2^-4 relative
E4M3_SUB = 2.0**-10 / 448  # below 2^-6 (subnormals): <= half of 2^-9, in units of absmax


def fp8_error_bound(q, k, v, scale, mask):
    """Worst-case |o_fp8 - o| per output element [B, L, N, D], propagated from per-element rounding.

    Per element, with s = group absmax / 448 <= tensor absmax / 448 (per batch and head):
      |x_hat - x| <= e(x) = 2^-4 |x| + 2^-10 s        (normal range + subnormal floor)
    Scores: |q_hat.k_hat - q.k| <= sum_d e(q_d)(|k_d| + e(k_d)) + |q_d| e(k_d); times the softmax
    scale this is Delta_ij; with Delta_i = max over allowed j, every softmax weight moves by a
    factor in [e^-2Delta_i, e^2Delta_i], so sum_j |w~_ij - w_ij| <= expm1(2 Delta_i).
    P rounding adds sum_j |w^_ij - w~_ij| <= 2^-4 + n_i 2^-10 / 448 (the denominator sums the
    unrounded p and is >= 1 since the row max contributes exp(0)).
    Then |o^_i - o_i| <= max_j |v^_j| sum_j |w^_ij - w_ij| + max_j |v^_j - v_j| per channel.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))

    def err(x, axes):
        return E4M3_REL * np.abs(x) + E4M3_SUB * np.abs(x).max(axis=axes, keepdims=True)

    eq, ek = err(q, (1, 3)), err(k, (1, 3))
    ds = scale * (
        np.einsum("bqnd,bknd->bnqk", eq, np.abs(k) + ek)
        + np.einsum("bqnd,bknd->bnqk", np.abs(q), ek)
    )
    delta = np.where(mask, ds, 0).max(-1)  # [B, N, L]
    n_keys = mask.sum(-1)  # [L]
    w_err = np.expm1(2 * delta) + E4M3_REL + n_keys * E4M3_SUB  # [B, N, L]
    ev = err(v, (1,))  # per (batch, head, channel) absmax
    v_hat_max = (np.abs(v) + ev).max(axis=1, keepdims=True)  # [B, 1, N, D]
    return np.einsum("bnq->bqn", w_err)[..., None] * v_hat_max + ev.max(axis=1, keepdims=True)


class TestReferenceAttention(AttentionBehaviour):
    impl = "reference"

    @settings(max_examples=15)
    @given(grid=grids, config=configs(quant=st.just("fp8")), seed=st.integers(0, 2**16))
    def test_fp8_error_within_derived_bound(self, grid, config, seed):
        q, k, v = random_qkv(seed, (2, math.prod(grid), 2, 8))
        mask = brute_token_mask(grid, config.tile, config.window)
        out = jit_attention(q, k, v, grid, config, "reference")
        exact = numpy_attention(q, k, v, 8**-0.5, mask)
        bound = fp8_error_bound(q, k, v, 8**-0.5, mask)
        # 1e-5: float32 arithmetic of the reference itself, far below the FP8 terms.
        assert np.all(np.abs(np.asarray(out, np.float64) - exact) <= bound + 1e-5)

    def test_fp8_actually_quantizes(self):
        # Guards the bound test against passing vacuously with quantization switched off.
        q, k, v = random_qkv(5, (1, 64, 2, 16))
        cfg = FPSAConfig(tile=(2, 2, 2), quant="fp8")
        out = jit_attention(q, k, v, (4, 4, 4), cfg, "reference")
        err = np.abs(np.asarray(out) - numpy_attention(q, k, v, 0.25))
        assert 1e-4 < err.max() < 0.1

    def test_fp8_is_exact_on_representable_inputs(self):
        # Inputs that are already E4M3 values at a power-of-two scale, with q = 0 (all p = 1):
        # every quantization step is exact, so the result equals unquantized attention.
        _, k, v = random_qkv(6, (1, 27, 1, 8))
        k, v = (jnp.asarray(x, jnp.float8_e4m3fn).astype(jnp.float32) for x in (k, v))
        k = k.at[:, :, :, 0].set(448.0)  # absmax 448 in every tile: s = 1 exactly
        v = v.at[:, 0].set(448.0)
        q = jnp.zeros_like(k)
        cfg = FPSAConfig(tile=(1, 3, 3), window=(1, 1, 3), quant="fp8")
        out = jit_attention(q, k, v, (3, 3, 3), cfg, "reference")
        want = numpy_attention(q, k, v, 8**-0.5, brute_token_mask((3, 3, 3), cfg.tile, cfg.window))
        np.testing.assert_allclose(out, want, rtol=1e-6)
