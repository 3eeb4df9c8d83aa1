"""The Pallas FPSA kernel against the reference and the XLA path.

On CPU every test runs the kernel with `interpret=True` (the default off GPU); the `gpu` tests run
the same checks through the Triton lowering.

FP8 tolerance. The kernel rounds P to E4M3 against the running row max, the reference against the
final one; everything else (the quantized Q, K, V values and scales, the unrounded denominator) is
the same. Write p for the exact weight exp(s - m_final) in [0, 1] and S for config.scale. Either
way a weight is w = e4m3(p' S) / S * exp(m' - m_final) with p' = p exp(m_final - m'), i.e. one
round-to-nearest of p on some E4M3 grid (scaled by an exact float32 factor):
  - normal range (p' S >= 2^-6): |w - p| <= 2^-4 p (3 mantissa bits, half an ulp);
  - subnormal range, or flushed to zero: |w - p| <= 2^-10 / S (half the spacing 2^-9).
So with l = sum_j p_j >= 1 (the max term is 1) and n keys per row, each output element obeys
  |o - o_exact| <= sum_j |w_j - p_j| |v_j| / l <= (2^-4 + n 2^-10 / S) max|v_hat|,
where o_exact is attention on the quantized Q, K, V without P rounding. Kernel and reference both
satisfy it, so they differ by at most twice that. When a row's key tiles fit in one key block, the
running max is the final max and the kernel must agree with the XLA path exactly (up to float32
round-off, which can flip a rounding at a near-tie in a row or two).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fpsa_jax.attention import FPSAConfig
from fpsa_jax.attention.kernel_layout import key_block_list
from fpsa_jax.attention.mask import build_mask_info
from fpsa_jax.attention.pallas import default_block, pallas_attention
from fpsa_jax.attention.reference import quantize_qkv, reference_attention
from fpsa_jax.attention.xla import xla_attention
from pallas_kernels import pallas_fpsa
from tests.attention.fpsa_testlib import AttentionBehaviour
from tests.kernels.kernel_suite import KernelBehaviour

GRIDS = st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 6))
TILES = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4))
WINDOWS = st.none() | st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))
GROUPS = st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 3))
F32_RTOL = 1e-5  # float32 kernel (IEEE dots) against the float32 reference


@st.composite
def configs(draw, quant):
    return FPSAConfig(
        tile=draw(TILES),
        window=draw(WINDOWS),
        quant=quant,
        q_group=draw(GROUPS),
        k_group=draw(GROUPS),
    )


def random_qkv(seed, shape, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in keys)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@functools.partial(jax.jit, static_argnames=("fn", "grid", "config", "scale", "kwargs"))
def _run(fn, q, k, v, *, grid, config, scale, kwargs=()):
    return fn(q, k, v, grid=grid, config=config, scale=scale, **dict(kwargs))


def pallas(q, k, v, grid, config, scale, **kwargs):
    """The kernel under jit (interpret mode off GPU); kwargs go to `pallas_attention`."""
    return _run(
        pallas_attention,
        q,
        k,
        v,
        grid=grid,
        config=config,
        scale=scale,
        kwargs=tuple(sorted(kwargs.items())),
    )


def reference(q, k, v, grid, config, scale):
    return _run(reference_attention, q, k, v, grid=grid, config=config, scale=scale)


def xla(q, k, v, grid, config, scale):
    return _run(xla_attention, q, k, v, grid=grid, config=config, scale=scale)


@functools.partial(jax.jit, static_argnames=("grid", "config", "scale"))
def exact_p_attention(q, k, v, *, grid, config, scale):
    """(o_exact, v_hat, o_ref): attention on the quantized Q, K, V without P rounding (o_exact of
    the module docstring), the quantized V, and the reference with its P rounding."""
    q_hat, k_hat, v_hat = quantize_qkv(q, k, v, grid, config)
    unrounded = FPSAConfig(tile=config.tile, window=config.window)
    ref = reference_attention(q, k, v, grid=grid, config=config, scale=scale)
    exact = reference_attention(q_hat, k_hat, v_hat, grid=grid, config=unrounded, scale=scale)
    return exact, v_hat, ref


def fp8_bound(v_hat, n_keys, config):
    """(2^-4 + n 2^-10 / S) max|v_hat|: see the module docstring."""
    return (2**-4 + n_keys * 2**-10 / config.scale) * float(jnp.abs(v_hat).max())


class TestPallasAttention(AttentionBehaviour):
    impl = "pallas"
    differentiable = False


class TestPallasKernel(KernelBehaviour):
    """The shared kernel suite: interpreted on CPU, through the Triton lowering on a GPU."""

    impl = "pallas"

    def kernel(self, ops, info, scale, p_scale, out_dtype):
        args = (ops.q, ops.k, ops.v_t, ops.q_scale, ops.k_scale, ops.v_scale, ops.key_bias)
        blocks = key_block_list(ops.grid, ops.tile, info.window, ops.padded_tile, 64)
        fn = lambda *a: pallas_fpsa.fpsa_forward(
            *a, blocks.blocks, blocks.count, padded_tile=ops.padded_tile, scale=scale,
            p_scale=p_scale, out_dtype=out_dtype, block_q=64, block_k=64,
            interpret=jax.default_backend() != "gpu",
        )  # fmt: skip
        return jax.jit(fn)(*args)


@settings(max_examples=8)
@given(grid=GRIDS, config=configs("none"), seed=st.integers(0, 2**16))
def test_unquantized_matches_reference(grid, config, seed):
    q, k, v = random_qkv(seed, (1, math.prod(grid), 2, 8))
    out = pallas(q, k, v, grid, config, 0.35)
    ref = reference(q, k, v, grid, config, 0.35)
    assert out.dtype == jnp.float32 and out.shape == q.shape
    assert rel_err(out, ref) <= F32_RTOL


@settings(max_examples=8)
@given(grid=GRIDS, config=configs("fp8"), seed=st.integers(0, 2**16))
def test_fp8_within_p_rounding_bound(grid, config, seed):
    q, k, v = random_qkv(seed, (1, math.prod(grid), 2, 8))
    scale = 8**-0.5
    out = np.asarray(pallas(q, k, v, grid, config, scale))
    exact, v_hat, ref = exact_p_attention(q, k, v, grid=grid, config=config, scale=scale)
    bound = fp8_bound(v_hat, math.prod(grid), config) + 1e-5
    assert np.abs(out - np.asarray(exact)).max() <= bound
    assert np.abs(out - np.asarray(ref)).max() <= 2 * bound


@pytest.mark.parametrize(
    "grid, tile, window, groups",
    [
        ((3, 5, 6), (1, 2, 2), (1, 1, 1), ((1, 1, 1), (1, 1, 1))),
        ((2, 3, 7), (2, 2, 3), (1, 1, 1), ((2, 1, 2), (1, 2, 1))),
        ((2, 2, 3), (3, 3, 3), None, ((1, 1, 1), (1, 1, 1))),  # grid inside one tile
    ],
)
def test_fp8_single_key_block_matches_xla_exactly(grid, tile, window, groups):
    config = FPSAConfig(tile=tile, window=window, quant="fp8", q_group=groups[0], k_group=groups[1])
    assert build_mask_info(grid, tile, window).kv_count == 1
    q, k, v = random_qkv(11, (2, math.prod(grid), 3, 16))
    out = np.asarray(pallas(q, k, v, grid, config, 0.25))
    want = np.asarray(xla(q, k, v, grid, config, 0.25))
    diff = np.abs(out - want).max(-1)  # [B, L, N]
    assert (diff > 1e-5).sum() <= 2, f"{(diff > 1e-5).sum()} rows of {diff.size} disagree"


@pytest.mark.parametrize("block_q, block_k", [(16, 16), (32, 16), (16, 64)])
def test_block_sizes_only_move_fp8_rounding(block_q, block_k):
    grid = (2, 4, 5)
    q, k, v = random_qkv(6, (1, 40, 2, 8))
    for quant in ("none", "fp8"):
        config = FPSAConfig(tile=(2, 3, 5), window=(1, 2, 1), quant=quant)  # P = 30
        out = pallas(q, k, v, grid, config, 0.3, block_q=block_q, block_k=block_k)
        if quant == "none":
            ref = reference(q, k, v, grid, config, 0.3)
            assert rel_err(out, ref) <= F32_RTOL
        else:
            exact, v_hat, _ = exact_p_attention(q, k, v, grid=grid, config=config, scale=0.3)
            assert np.abs(out - exact).max() <= fp8_bound(v_hat, 40, config) + 1e-5


def test_dense_config_none_spans_several_kernel_tiles():
    grid = (3, 7, 9)  # 189 tokens: two dense tiles of 128, the second padded
    q, k, v = random_qkv(7, (2, 189, 2, 8))
    out = pallas(q, k, v, grid, None, 0.3)
    assert rel_err(out, reference(q, k, v, grid, None, 0.3)) <= F32_RTOL


@pytest.mark.parametrize("quant, rtol", [("none", 1e-2), ("fp8", None)])
def test_bf16_inputs_stay_within_bf16_tolerance(quant, rtol):
    grid, config = (2, 4, 6), FPSAConfig(tile=(1, 2, 3), window=(2, 1, 2), quant=quant)
    q, k, v = random_qkv(8, (1, 48, 2, 16), jnp.bfloat16)
    out = pallas(q, k, v, grid, config, 0.25)
    assert out.dtype == jnp.bfloat16
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    if quant == "none":
        # bf16 P into the PV dot (2^-9 relative) and a bf16 output (2^-9): well under 1e-2.
        ref = reference(q32, k32, v32, grid, config, 0.25)
        assert rel_err(out, ref) <= rtol
    else:
        # E4M3 values are exact in bf16: the FP8 bound plus the bf16 output rounding.
        exact, v_hat, _ = exact_p_attention(q32, k32, v32, grid=grid, config=config, scale=0.25)
        bound = fp8_bound(v_hat, 48, config) + 2**-8 * float(jnp.abs(v_hat).max())
        assert np.abs(np.asarray(out, np.float32) - exact).max() <= bound


def test_default_block_pads_least():
    assert default_block(192) == 64 and default_block(27) == 32 and default_block(3) == 16
    assert default_block(256) == 128 and default_block(100) == 128


def test_rejects_non_power_of_two_block():
    q, k, v = random_qkv(0, (1, 8, 1, 8))
    with pytest.raises(ValueError, match="block_q must be a power of two"):
        pallas_attention(q, k, v, grid=(1, 2, 4), config=None, scale=1.0, block_q=24)


# ----------------------------------------------------------------------------- GPU (Triton)


def _check_against_xla(grid, config, shape, dtype, seed=0):
    q, k, v = random_qkv(seed, shape, dtype)
    scale = shape[-1] ** -0.5
    out = jax.jit(
        lambda q, k, v: pallas_attention(
            q, k, v, grid=grid, config=config, scale=scale, interpret=False
        )
    )(q, k, v)
    want = jax.jit(lambda q, k, v: xla_attention(q, k, v, grid=grid, config=config, scale=scale))(
        q, k, v
    )
    out, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(out).all()
    if config is not None and config.quant == "fp8":
        _, _, v_hat = quantize_qkv(*(x.astype(jnp.float32) for x in (q, k, v)), grid, config)
        n_keys = build_mask_info(grid, config.tile, config.window).kv_count * config.tile_volume
        bound = 2 * fp8_bound(v_hat, n_keys, config)
        if dtype == jnp.bfloat16:
            bound += 2**-7 * float(jnp.abs(v_hat).max())
        assert np.abs(out - want).max() <= bound
    else:
        assert rel_err(out, want) <= (F32_RTOL if dtype == jnp.float32 else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["none", "fp8"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_small_matches_xla(quant, dtype):
    config = FPSAConfig(tile=(2, 2, 3), window=(2, 2, 2), quant=quant, q_group=(1, 2, 1))
    _check_against_xla((3, 5, 7), config, (2, 105, 2, 16), dtype)
    _check_against_xla((3, 5, 7), None, (2, 105, 2, 16), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["none", "fp8"])
def test_gpu_wan_shape_matches_xla(quant):
    # The 480p latent grid of Wan 1.3B with the schedule's tile, 2 heads of 128.
    config = FPSAConfig(tile=(3, 8, 8), window=(3, 3, 3), quant=quant)
    _check_against_xla((21, 30, 52), config, (1, 21 * 30 * 52, 2, 128), jnp.bfloat16)
