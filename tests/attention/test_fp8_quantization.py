"""FP8 quantization exactly as specified: group/channel scales, E4M3 rounding, the STE."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from fpsa_testlib import grids, groups, tiles
from hypothesis import given, settings
from hypothesis import strategies as st

from fpsa_jax.attention import QuantizedTensor
from fpsa_jax.attention.quant import (
    e4m3_round,
    fake_quant_channels,
    fake_quant_channels_tiles,
    fake_quant_p,
    fake_quant_tiles,
    quantize_channels,
    quantize_tiles,
    safe_scale,
    straight_through,
)
from fpsa_jax.attention.tiling import slot_valid, tile_grid, to_tiles


def numpy_e4m3(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)


@settings(max_examples=15)
@given(grid=grids, tile=tiles, group=groups, seed=st.integers(0, 2**16))
def test_tile_group_quantization_matches_brute_force(grid, tile, group, seed):
    x = jax.random.normal(jax.random.key(seed), (2, math.prod(grid), 2, 4)) * 3
    x = x.at[1].set(0.0)  # an all-zero batch element: every scale must be 1
    n = tile_grid(grid, tile)
    valid = slot_valid(grid, tile)
    xt = to_tiles(x, grid, tile)
    qt = jax.jit(lambda xt: quantize_tiles(xt, valid, n, group))(xt)
    xn = np.asarray(x, np.float64)
    # Scale of a token = absmax over the tokens whose tile falls in the same group, per (b, head).
    coords = np.stack(np.unravel_index(np.arange(math.prod(grid)), grid), -1)
    gid = coords // np.array(tile) // np.array(group)
    scales_tok = np.empty((2, math.prod(grid), 2))
    for i in range(math.prod(grid)):
        same = np.all(gid == gid[i], axis=1)
        amax = np.abs(xn[:, same]).max(axis=(1, 3))  # [B, N]
        scales_tok[:, i] = np.where(amax > 0, amax / 448, 1.0)
    scales_t = np.asarray(to_tiles(jnp.asarray(scales_tok[..., None], jnp.float32), grid, tile))
    got = np.asarray(jnp.broadcast_to(qt.scales, xt.shape))[..., :1]
    # float32 division by 448 in the library: one float32 ulp (1.2e-7 relative) of difference.
    np.testing.assert_allclose(got[:, valid], scales_t[:, valid], rtol=3e-7)
    assert np.all(np.asarray(qt.scales)[1] == 1.0)
    assert qt.values.dtype == jnp.float8_e4m3fn
    # Same float32 division as the library, so the E4M3 rounding must agree bit for bit.
    want = numpy_e4m3(np.asarray(xt, np.float32) / got).astype(np.float32) * got
    np.testing.assert_array_equal(np.asarray(qt.dequantize())[:, valid], want[:, valid])


def test_rounding_error_is_at_most_half_an_ulp():
    # E4M3 has 3 mantissa bits: for normal values (|x / s| >= 2^-6) the relative error <= 2^-4.
    x = jax.random.normal(jax.random.key(1), (1, 64, 1, 32))
    x_hat = quantize_channels(x).dequantize()
    s = np.abs(np.asarray(x)).max(axis=1, keepdims=True) / 448
    normal = np.abs(np.asarray(x)) / s >= 2.0**-6
    rel = np.abs(np.asarray(x_hat) - np.asarray(x)) / np.abs(np.asarray(x))
    assert rel[normal].max() <= 2.0**-4 + 1e-7
    # The absmax element maps to 448 and comes back up to float32 round-off of x / s * s.
    np.testing.assert_allclose(
        np.abs(np.asarray(x_hat)).max(axis=1), np.abs(np.asarray(x)).max(axis=1), rtol=3e-7
    )


def test_value_scales_are_per_channel_over_all_tokens():
    x = jax.random.normal(jax.random.key(2), (2, 10, 3, 4))
    q = quantize_channels(x)
    assert q.scales.shape == (2, 1, 3, 4)
    want = np.abs(np.asarray(x)).max(axis=1, keepdims=True) / np.float32(448)
    np.testing.assert_allclose(q.scales, want, rtol=3e-7)
    grid, tile = (1, 2, 5), (1, 2, 2)
    valid = slot_valid(grid, tile)
    xt = to_tiles(x, grid, tile)
    xt = jnp.where(jnp.asarray(valid)[None, :, :, None, None], xt, 1e4)  # padding is ignored
    want = to_tiles(q.dequantize(), grid, tile)
    np.testing.assert_array_equal(
        np.asarray(fake_quant_channels_tiles(xt, valid))[:, valid], np.asarray(want)[:, valid]
    )


def test_p_quantization_uses_the_static_scale():
    p = jnp.linspace(0.0, 1.0, 101)
    for scale in (448.0, 100.0):
        # The E4M3 rounding must agree exactly; the final division may differ by one float32 ulp
        # (XLA may multiply by the reciprocal, and the straight-through add rounds once more).
        want = numpy_e4m3(np.asarray(p) * np.float32(scale)) / scale
        np.testing.assert_allclose(fake_quant_p(p, scale), want, rtol=3e-7)
    assert float(fake_quant_p(jnp.ones(()), 448.0)) == 1.0


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: fake_quant_tiles(x, slot_valid((2, 3, 2), (1, 2, 2)), (2, 2, 1), (2, 1, 1)),
        lambda x: fake_quant_channels_tiles(x, slot_valid((2, 3, 2), (1, 2, 2))),
        lambda x: fake_quant_channels(x.reshape(1, 16, 2, 2)),
        lambda x: fake_quant_p(jnp.abs(x) / (jnp.abs(x).max() + 1), 448.0),
    ],
    ids=["qk_groups", "v_tiles", "v_tokens", "p"],
)
def test_quantizer_gradient_is_identity(fn):
    x = jax.random.normal(jax.random.key(3), (1, 4, 4, 2, 2)) * 2
    out, vjp = jax.vjp(lambda x: fn(x).reshape(-1), x)
    assert not np.array_equal(out, np.asarray(x).reshape(-1))  # it did quantize
    cot = jax.random.normal(jax.random.key(4), out.shape)
    (g,) = vjp(cot)
    if fn.__name__ == "<lambda>" and out.shape == (64,) and np.all(np.asarray(out) >= 0):
        # p path: d/dx of |x| / c is not the identity; compare with the unquantized map instead.
        (g_plain,) = jax.vjp(lambda x: (jnp.abs(x) / (jnp.abs(x).max() + 1)).reshape(-1), x)[1](cot)
        np.testing.assert_allclose(g, g_plain, rtol=1e-6)
    else:
        np.testing.assert_array_equal(np.asarray(g).reshape(-1), np.asarray(cot))


def test_quantized_tensor_is_a_pytree_through_jit():
    x = jax.random.normal(jax.random.key(5), (1, 8, 2, 4))
    qt = jax.jit(quantize_channels)(x)
    assert isinstance(qt, QuantizedTensor) and qt.layout == "tokens:channel"
    leaves = jax.tree_util.tree_leaves(qt)
    assert len(leaves) == 2 and leaves[0].dtype == jnp.float8_e4m3fn
    np.testing.assert_allclose(jax.jit(lambda t: t.dequantize())(qt), x, rtol=2.0**-4)


def _every_e4m3_value_midpoint_and_neighbour():
    """float32 [M]: every finite E4M3 value, the midpoints between neighbours (ties) and a float32
    ulp either side of each midpoint, both signs, plus a log-spaced sweep down to 1e-12."""
    vals = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    vals = np.unique(vals[np.isfinite(vals)])
    mids = (vals[1:] + vals[:-1]) / 2
    x = [vals, mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)]
    x = np.concatenate(x + [np.logspace(-12, np.log10(448), 4000, dtype=np.float32)])
    return np.concatenate([x, -x]).astype(np.float32)


def test_e4m3_round_equals_the_cast_on_every_value_and_tie():
    x = _every_e4m3_value_midpoint_and_neighbour()
    got = np.asarray(jax.jit(e4m3_round)(x))
    np.testing.assert_array_equal(got, numpy_e4m3(x).astype(np.float32))


def test_safe_scale_is_absmax_over_448_and_one_for_an_all_zero_block():
    amax = np.array([0.0, 448.0, 1.0, 3e-5], np.float32)
    want = np.where(amax > 0, amax / np.float32(448), 1).astype(np.float32)
    got = safe_scale(jnp.asarray(amax))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=2**-23)


def test_straight_through_is_x_hat_forward_and_the_identity_backward():
    x = jnp.array([0.3, -1.7, 2.2])
    x_hat = jnp.round(x)
    np.testing.assert_array_equal(straight_through(x, x_hat), x_hat)
    grad = jax.grad(lambda x: jnp.sum(straight_through(x, jnp.round(x)) * jnp.arange(3.0)))(x)
    np.testing.assert_array_equal(grad, [0.0, 1.0, 2.0])


@pytest.mark.gpu
def test_rounding_survives_xla_gpu_inside_one_jit():
    # XLA on GPU drops f32 -> f8 -> f32 convert pairs under jit (excess precision); the
    # quantizers must round anyway.
    x = _every_e4m3_value_midpoint_and_neighbour()
    want = numpy_e4m3(x).astype(np.float32)
    p = np.abs(x) / 448

    @jax.jit
    def everything(x, p):
        values = quantize_channels(x[None, :, None, None]).values.astype(jnp.float32)
        return e4m3_round(x), fake_quant_p(p, 448.0) * 448, values

    rounded, p_hat, values = everything(x, p)
    np.testing.assert_array_equal(np.asarray(rounded), want)
    np.testing.assert_allclose(np.asarray(p_hat), numpy_e4m3(p * 448), rtol=1e-6)
    scale = np.abs(x).max() / np.float32(448)  # float32 throughout, as the quantizer
    np.testing.assert_array_equal(np.asarray(values).ravel(), numpy_e4m3(x / scale))
