"""The DiT's cross-attention on cuDNN (`text_attention(impl="cudnn")`, what "auto" picks on a GPU
for bf16) against the XLA einsums and float64 NumPy, forward and gradients (`gpu` marker).

Both paths keep the scores and the softmax in float32 and round the probabilities to bf16 for the
weighted sum, so they differ by bf16 roundings in different places: relative L2 a few 1e-3 on
standard-normal inputs, the tolerance below is 1e-2 (the bf16 output rounding alone is 2^-9).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpsa_jax.model.wan import text_attention
from tests.model.test_text_attention import _np_text_attention, _qkv

pytestmark = pytest.mark.gpu


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_cudnn_text_attention_matches_xla_and_float64_at_a_wan_like_odd_shape():
    # L not a multiple of 64 or 128; 512 text rows as Wan pads to; D = 128.
    q, k, v = _qkv(b=2, length=4133, text=512, n=4, d=128, dtype=jnp.bfloat16)
    compiled = jax.jit(lambda q, k, v: text_attention(q, k, v)).lower(q, k, v).compile()
    assert "cudnn" in compiled.as_text().lower()  # auto took cuDNN's fused attention
    out = compiled(q, k, v)
    xla = text_attention(q, k, v, impl="xla")
    assert out.dtype == jnp.bfloat16
    exact = _np_text_attention(q, k, v)
    assert _rel(xla, exact) < 1e-2
    assert _rel(out, exact) < 1e-2
    assert _rel(out, xla) < 1e-2


@pytest.mark.parametrize("length", [1031, 1024])  # XLA's backward, cuDNN's (multiple of 64)
def test_cudnn_text_attention_gradients_match_xla(length):
    q, k, v = _qkv(b=1, length=length, text=512, n=2, d=128, seed=1, dtype=jnp.bfloat16)
    ct = jax.random.normal(jax.random.key(0), q.shape, jnp.bfloat16)

    def grads(impl):
        loss = lambda q, k, v: jnp.sum(text_attention(q, k, v, impl=impl) * ct)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for g_cudnn, g_xla in zip(grads("cudnn"), grads("xla"), strict=True):
        assert _rel(g_cudnn, g_xla) < 2e-2
