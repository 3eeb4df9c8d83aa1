"""`random_weights`: normal leaves of the right shapes and dtypes, on the host and on the device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpsa_jax.model import random_weights as rw


def _init(key):
    del key
    return {
        "kernel": jnp.zeros((300, 400), jnp.bfloat16),
        "norm": {"scale": jnp.zeros((400,), jnp.float32)},
    }


@pytest.mark.parametrize("draw", ["host", "device"])
def test_bfloat16_leaves_are_a_rounded_normal_not_a_bfloat16_lattice(draw, monkeypatch):
    # Above HOST_DRAW_LIMIT the draw runs in jax.random; drawn in bfloat16 itself it had 128
    # distinct values cut at ~2.9 std (120,000 float32 draws give ~4.4 std and thousands).
    monkeypatch.setattr(rw, "HOST_DRAW_LIMIT", 10**9 if draw == "host" else 0)
    params = rw.random_weights(_init, jax.random.key(0), std=0.02)
    kernel = params["kernel"]
    assert kernel.shape == (300, 400) and kernel.dtype == jnp.bfloat16
    w = np.asarray(kernel, np.float64)
    assert len(np.unique(w)) > 2000
    assert abs(w.std() / 0.02 - 1) < 0.02  # 120,000 samples: the std's own spread is ~0.2%
    assert np.abs(w).max() > 3.8 * 0.02
    assert params["norm"]["scale"].dtype == jnp.float32
    scale = np.asarray(params["norm"]["scale"], np.float64)  # norm gains: 1 + noise
    assert abs(scale.mean() - 1) < 0.01 and scale.std() > 0.01


def test_the_same_key_gives_the_same_weights():
    a, b = (rw.random_weights(_init, jax.random.key(3)) for _ in range(2))
    np.testing.assert_array_equal(np.asarray(a["kernel"]), np.asarray(b["kernel"]))
