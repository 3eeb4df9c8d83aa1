"""The DiT's cross-attention core (`wan.text_attention`) against float64 NumPy, and its impl choice.

The cuDNN path needs a GPU: `test_text_attention_gpu.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpsa_jax.model.wan import text_attention


def _np_text_attention(q, k, v):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("blnd,bknd->bnlk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnlk,bknd->blnd", p, v)


def _qkv(b=2, length=37, text=11, n=3, d=16, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, length, n, d))
    k, v = (rng.standard_normal((b, text, n, d)) for _ in range(2))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def test_xla_text_attention_matches_float64_numpy_at_odd_sizes():
    q, k, v = _qkv()
    out = text_attention(q, k, v, impl="xla")
    assert out.shape == q.shape and out.dtype == jnp.float32
    # float32 inputs at HIGHEST precision: only float32 rounding remains.
    np.testing.assert_allclose(out, _np_text_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_auto_is_the_xla_path_off_the_gpu_and_for_float32():
    q, k, v = _qkv(dtype=jnp.bfloat16)
    if jax.default_backend() != "gpu":
        np.testing.assert_array_equal(text_attention(q, k, v), text_attention(q, k, v, impl="xla"))
    q32, k32, v32 = _qkv()
    np.testing.assert_array_equal(
        text_attention(q32, k32, v32), text_attention(q32, k32, v32, impl="xla")
    )


def test_bad_impls_are_refused_with_the_reason():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="must be auto, cudnn or xla, got 'flash'"):
        text_attention(q, k, v, impl="flash")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="'cudnn' needs an NVIDIA GPU"):
            text_attention(q, k, v, impl="cudnn")
