"""`fpsa_attention` at its edges (issue 15.10): a bad softmax scale is refused, a NumPy grid is a
grid, and non-finite inputs give what the docstring says (reference and xla alike)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpsa_jax.attention import FPSAConfig, fpsa_attention

GRID = (2, 4, 4)
B, L, N, D = 1, 32, 2, 16
FP8 = FPSAConfig(tile=(1, 2, 2), window=(2, 2, 2), quant="fp8")
# A window of half the tiles: some queries do not attend a given key.
BF = FPSAConfig(tile=(1, 2, 2), window=(1, 2, 1))
FP8_HALF = FPSAConfig(tile=(1, 2, 2), window=(1, 2, 1), quant="fp8")


def _qkv(seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (B, L, N, D), jnp.float32) for k in keys]


@pytest.mark.parametrize("scale", [math.nan, math.inf, 0.0, -0.5, "0.25"])
def test_a_scale_that_is_not_a_finite_positive_number_is_refused(scale):
    """Before: NaN or inf gave an all-NaN output, 0 or a negative scale a wrong one, silently."""
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        fpsa_attention(q, k, v, grid=GRID, config=FP8, impl="xla", scale=scale)


def test_a_numpy_grid_is_a_grid():
    """Before: np.array([2, 4, 4]) was refused as "not 3 positive ints"."""
    q, k, v = _qkv()
    want = fpsa_attention(q, k, v, grid=GRID, config=FP8, impl="xla")
    got = fpsa_attention(
        q, k, v, grid=np.array(GRID), config=FP8, impl="xla", scale=np.float32(0.25)
    )
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="grid must be 3 positive ints"):
        fpsa_attention(q, k, v, grid=np.array([2.0, 4.0, 4.0]), config=FP8, impl="xla")


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_one_inf_in_k_under_fp8_saturates_to_its_groups_largest_value(impl):
    """Before: the inf made its group's scale inf and every key of the group NaN, so the whole
    head (every query attends the group) was NaN. Now the inf key weighs as the group's largest
    magnitude: exactly the output of that key holding the group's finite absmax."""
    q, k, v = _qkv()
    token, head, channel = 5, 0, 3
    k_inf = k.at[0, token, head, channel].set(jnp.inf)
    out = fpsa_attention(q, k_inf, v, grid=GRID, config=FP8, impl=impl)
    assert np.isfinite(out).all()
    # Token 5 = (t 0, h 1, w 1) lies in tile (0, 0, 0): tokens (0, 0..1, 0..1) of head 0.
    tile = [0, 1, 4, 5]
    absmax = jnp.abs(k[0, tile, head]).max()
    saturated = k.at[0, token, head, channel].set(absmax)
    np.testing.assert_array_equal(
        out, fpsa_attention(q, saturated, v, grid=GRID, config=FP8, impl=impl)
    )


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_non_finite_inputs_without_fp8_follow_ieee_and_nan_stays_local(impl):
    q, k, v = _qkv()
    k_inf = k.at[0, 5, 0, 3].set(jnp.inf)
    out = np.asarray(fpsa_attention(q, k_inf, v, grid=GRID, config=BF, impl=impl))
    # q . k = +inf: that query row is NaN; -inf: the key is ignored; the other head untouched.
    rows_nan = np.isnan(out[0, :, 0]).any(axis=-1)
    attends = np.asarray(_attends(5))
    assert attends.any() and not attends.all()
    np.testing.assert_array_equal(rows_nan, attends & (np.asarray(q)[0, :, 0, 3] > 0))
    assert np.isfinite(out[0, :, 1]).all()
    # A NaN under FP8 is NaN in its own entry only: the rows that attend it, not the whole head.
    k_nan = k.at[0, 5, 0, 3].set(jnp.nan)
    out = np.asarray(fpsa_attention(q, k_nan, v, grid=GRID, config=FP8_HALF, impl=impl))
    np.testing.assert_array_equal(np.isnan(out[0, :, 0]).any(axis=-1), attends)
    assert np.isfinite(out[0, :, 1]).all()


def _attends(key: int):
    """bool [L]: which queries BF's window lets attend token `key`."""
    from fpsa_jax.attention.tiling import token_mask

    return token_mask(GRID, BF.tile, BF.window)[:, key]
