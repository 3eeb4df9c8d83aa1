"""The blocked XLA path: same function as the reference, chunking and padding invisible."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fpsa_testlib import (
    F32_RTOL,
    AttentionBehaviour,
    configs,
    grids,
    jit_attention,
    random_qkv,
    rel_err,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from fpsa_jax.attention import FPSAConfig, build_mask_info, fpsa_attention
from fpsa_jax.attention import xla as xla_mod
from fpsa_jax.attention.reference import quantize_qkv
from fpsa_jax.attention.tiling import from_tiles, slot_valid, to_tiles


class TestXlaAttention(AttentionBehaviour):
    impl = "xla"


@settings(max_examples=15)
@given(grid=grids, config=configs(quant=st.just("fp8")), seed=st.integers(0, 2**16))
def test_fp8_matches_reference(grid, config, seed):
    """Same quantization in both, so agreement is exact up to float32 reduction order, except
    where a score sits within float32 round-off of an E4M3 rounding boundary of p * 448 and the
    two round p_hat to neighbouring values. Such a flip moves one weight by at most one E4M3 ulp,
    2^-3 of its value (or 2^-9 / 448 in the subnormal range), so per element
    |o_xla - o_ref| <= (2^-3 + n_keys 2^-9 / 448) max|v_hat| (weights sum to 1); flips need a
    near-tie, so at most a couple of rows of a small input may show one at all."""
    q, k, v = random_qkv(seed, (2, math.prod(grid), 2, 8))
    out = np.asarray(jit_attention(q, k, v, grid, config, "xla"), np.float64)
    ref = np.asarray(jit_attention(q, k, v, grid, config, "reference"), np.float64)
    v_max = np.abs(np.asarray(v)).max() * (1 + 2**-4)
    diff = np.abs(out - ref)
    assert diff.max() <= (2**-3 + math.prod(grid) * 2**-9 / 448) * v_max + 1e-5
    rows_off = (diff.max(-1) > 1e-5 * (1 + v_max)).sum()
    assert rows_off <= 2, f"{rows_off} of {diff[..., 0].size} rows disagree"


@pytest.mark.parametrize("chunk", [1, 2, 5])
@pytest.mark.parametrize("quant", ["none", "fp8"])
def test_chunked_tiles_equal_unchunked(chunk, quant):
    grid, cfg = (3, 5, 6), FPSAConfig(tile=(2, 2, 4), window=(2, 3, 1), quant=quant)
    info = build_mask_info(grid, cfg.tile, cfg.window)
    qt, kt, vt = (to_tiles(x, grid, cfg.tile) for x in random_qkv(7, (1, 90, 2, 8)))
    whole = xla_mod.tiled_attention(qt, kt, vt, info=info, config=cfg, scale=0.3)
    parts = xla_mod.tiled_attention(qt, kt, vt, info=info, config=cfg, scale=0.3, chunk_tiles=chunk)
    np.testing.assert_allclose(parts, whole, rtol=1e-6, atol=1e-6)


def test_chunked_dense_equals_unchunked():
    q, k, v = random_qkv(8, (2, 30, 2, 8))
    whole = xla_mod.dense_attention(q, k, v, scale=0.3)
    np.testing.assert_allclose(
        xla_mod.dense_attention(q, k, v, scale=0.3, chunk=7), whole, rtol=1e-6, atol=1e-7
    )


def test_automatic_chunking_matches_reference(monkeypatch):
    # A tiny budget forces several chunks through the public entry point, gradients included.
    monkeypatch.setattr(xla_mod, "SCORE_ELEMENTS_PER_CHUNK", 600)
    grid, cfg = (2, 4, 5), FPSAConfig(tile=(1, 2, 2), window=(1, 2, 2))
    q, k, v = random_qkv(9, (1, 40, 2, 8))
    for c in (cfg, None):
        loss = lambda q, k, v, impl, c=c: (
            fpsa_attention(q, k, v, grid=grid, config=c, impl=impl) ** 2
        ).sum()
        out, ref = (
            fpsa_attention(q, k, v, grid=grid, config=c, impl=i) for i in ("xla", "reference")
        )
        assert rel_err(out, ref) <= F32_RTOL
        g_out, g_ref = (jax.grad(loss, argnums=(0, 1, 2))(q, k, v, i) for i in ("xla", "reference"))
        for a, b in zip(g_out, g_ref, strict=True):
            assert rel_err(a, b) <= 1e-4


@pytest.mark.parametrize("quant", ["none", "fp8"])
def test_padded_slots_never_influence_valid_outputs(quant):
    grid, cfg = (3, 3, 5), FPSAConfig(tile=(2, 2, 2), window=(1, 2, 2), quant=quant)
    info = build_mask_info(grid, cfg.tile, cfg.window)
    qt, kt, vt = (to_tiles(x, grid, cfg.tile) for x in random_qkv(10, (2, 45, 2, 8)))
    pad = ~jnp.asarray(slot_valid(grid, cfg.tile))[None, :, :, None, None]
    noise = random_qkv(11, qt.shape, std=1e3)
    perturbed = [jnp.where(pad, x + n, x) for x, n in zip((qt, kt, vt), noise, strict=True)]
    assert not np.array_equal(perturbed[1], kt)
    run = lambda q, k, v: from_tiles(
        xla_mod.tiled_attention(q, k, v, info=info, config=cfg, scale=0.3), grid, cfg.tile
    )
    np.testing.assert_array_equal(run(*perturbed), run(qt, kt, vt))


def test_fp8_gradient_is_straight_through_at_exact_points():
    # With q = 0 every p is exactly 1 (no P rounding), so with the STE the FP8 op's gradient equals
    # the unquantized op's gradient evaluated at the quantized inputs.
    grid, cfg = (
        (2, 3, 4),
        FPSAConfig(tile=(1, 2, 2), window=(2, 1, 1), quant="fp8", k_group=(1, 2, 1)),
    )
    _, k, v = random_qkv(12, (1, 24, 2, 8))
    q = jnp.zeros_like(k)
    cot = random_qkv(13, k.shape)[0]
    loss = lambda c: (
        lambda q, k, v: (fpsa_attention(q, k, v, grid=grid, config=c, impl="xla") * cot).sum()
    )
    g_fp8 = jax.jit(jax.grad(loss(cfg), argnums=(0, 1, 2)))(q, k, v)
    q_hat, k_hat, v_hat = quantize_qkv(q, k, v, grid, cfg)
    plain = FPSAConfig(tile=cfg.tile, window=cfg.window)
    g_at_hat = jax.jit(jax.grad(loss(plain), argnums=(0, 1, 2)))(q_hat, k_hat, v_hat)
    for a, b in zip(g_fp8, g_at_hat, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fp8_gradient_is_close_to_straight_through_elsewhere():
    # In general the two differ only through P's rounding (<= 2^-4 relative per weight, and the
    # errors average out over keys), so the gradients agree to within that order.
    grid, cfg = (2, 3, 4), FPSAConfig(tile=(1, 2, 2), window=(2, 1, 1), quant="fp8")
    q, k, v = random_qkv(14, (1, 24, 2, 8))
    loss = lambda c: (
        lambda q, k, v: (fpsa_attention(q, k, v, grid=grid, config=c, impl="xla") ** 2).sum()
    )
    g_fp8 = jax.jit(jax.grad(loss(cfg), argnums=(0, 1, 2)))(q, k, v)
    plain = FPSAConfig(tile=cfg.tile, window=cfg.window)
    g_at_hat = jax.jit(jax.grad(loss(plain), argnums=(0, 1, 2)))(*quantize_qkv(q, k, v, grid, cfg))
    for a, b in zip(g_fp8, g_at_hat, strict=True):
        assert rel_err(a, b) <= 2**-4
