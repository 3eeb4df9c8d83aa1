"""A tile larger than the token grid is cut to the grid per axis before dispatch (api.clip_tile):
exactly the same function, and nothing sized by the tile instead of the grid."""

import jax
import numpy as np
import pytest
from fpsa_testlib import random_qkv
from jax.extend.core import jaxprs_in_params

from fpsa_jax.attention import FPSAConfig, fpsa_attention
from fpsa_jax.attention.api import clip_tile
from fpsa_jax.attention.reference import reference_attention

GRID = (2, 3, 5)


def test_clip_tile_cuts_only_the_axes_where_the_tile_exceeds_the_grid():
    config = FPSAConfig(tile=(4, 2, 8), window=(1, 1, 1), quant="fp8", q_group=(2, 1, 1))
    clipped = clip_tile(config, GRID)
    assert clipped.tile == (2, 2, 5)
    assert clipped.tile_grid(GRID) == config.tile_grid(GRID) == (1, 2, 1)
    assert (clipped.window, clipped.quant, clipped.q_group) == (
        config.window,
        config.quant,
        config.q_group,
    )
    fits = FPSAConfig(tile=(1, 3, 5))
    assert clip_tile(fits, GRID) is fits


@pytest.mark.parametrize("quant", ["none", "fp8"])
@pytest.mark.parametrize("window", [None, (1, 1, 1), (2, 1, 3)])
def test_clipped_tile_computes_what_the_unclipped_tile_defines(quant, window):
    """The oracle with the oversized tile itself (padded slots and all) against fpsa_attention,
    which runs the clipped one: n_a = 1 on the clipped axes either way, so nothing changes."""
    q, k, v = random_qkv(3, (2, 30, 2, 8))
    config = FPSAConfig(tile=(3, 2, 8), window=window, quant=quant, k_group=(1, 2, 1))
    unclipped = reference_attention(q, k, v, grid=GRID, config=config, scale=0.3)
    clipped = fpsa_attention(q, k, v, grid=GRID, config=config, impl="reference", scale=0.3)
    np.testing.assert_allclose(np.asarray(clipped), np.asarray(unclipped), rtol=1e-6, atol=1e-6)


def _largest_intermediate(jaxpr) -> int:
    """Elements of the largest value any equation of `jaxpr` (sub-jaxprs included) makes."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
        for sub in jaxprs_in_params(eqn.params):
            largest = max(largest, _largest_intermediate(sub))
    return largest


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_a_huge_tile_on_a_small_grid_allocates_for_the_grid(impl):
    """48 tokens with a (64, 64, 64)-token tile: before clipping every implementation padded to
    262,144 slots per head: the xla path traced a 137-billion-element intermediate, the
    reference one of 4.2 million (5,000x the input)."""
    q, k, v = random_qkv(1, (1, 48, 2, 8))
    config = FPSAConfig(tile=(64, 64, 64), window=(1, 1, 1), quant="fp8")
    run = lambda q, k, v: fpsa_attention(q, k, v, grid=(3, 4, 4), config=config, impl=impl)
    jaxpr = jax.make_jaxpr(run)(q, k, v)
    # The reference's [B, N, L, L] scores are 48x the input; anything tile-sized is 5,000x.
    assert _largest_intermediate(jaxpr.jaxpr) <= 64 * q.size
    # One tile covers the grid, so without FP8 this is dense attention.
    exact = FPSAConfig(tile=config.tile, window=config.window)
    out = fpsa_attention(q, k, v, grid=(3, 4, 4), config=exact, impl=impl)
    dense = fpsa_attention(q, k, v, grid=(3, 4, 4), config=None, impl="reference")
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense), rtol=1e-5, atol=1e-6)
