"""cuDNN baselines against the reference (GPU only)."""

import jax
import jax.numpy as jnp
import pytest
from fpsa_testlib import numpy_attention, random_qkv, rel_err

from fpsa_jax.attention import fpsa_attention
from fpsa_jax.attention.api import resolve_impl

pytestmark = pytest.mark.gpu

GRID = (4, 8, 8)  # L = 256: a multiple of 128, as cuDNN FP8 prefers


def _inputs():
    return random_qkv(0, (2, 256, 4, 128), dtype=jnp.bfloat16)


def test_auto_picks_cudnn_for_dense_bf16_on_gpu():
    assert resolve_impl("auto", None, jnp.bfloat16, 128) == "cudnn"
    assert resolve_impl("auto", None, jnp.float32, 128) == "xla"


def test_cudnn_matches_dense_reference():
    q, k, v = _inputs()
    out = jax.jit(lambda q, k, v: fpsa_attention(q, k, v, grid=GRID, impl="cudnn"))(q, k, v)
    assert out.dtype == jnp.bfloat16
    # bf16 output rounding (2^-9) plus bf16 P inside the kernel: ~1% relative L2 at most.
    assert rel_err(out, numpy_attention(q, k, v, 128**-0.5)) < 1e-2


def test_cudnn_fp8_matches_dense_reference():
    q, k, v = _inputs()
    out = jax.jit(lambda q, k, v: fpsa_attention(q, k, v, grid=GRID, impl="cudnn_fp8"))(q, k, v)
    assert out.dtype == jnp.bfloat16
    # Per-tensor E4M3 Q, K, V, P and output: each rounding <= 2^-4 relative; errors average over
    # keys and channels, so ~3-5% relative L2 is expected and 10% flags a wrong scale wiring.
    assert rel_err(out, numpy_attention(q, k, v, 128**-0.5)) < 0.1


def test_cudnn_rejects_float32():
    q, k, v = random_qkv(0, (1, 256, 2, 64))
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        fpsa_attention(q, k, v, grid=GRID, impl="cudnn")
