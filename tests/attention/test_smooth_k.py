"""`FPSAConfig(smooth_k=True)`: keys centred per (batch, head) before the operator, for every
impl. Exact without FP8 (the softmax ignores a per-query constant), smaller FP8 error when the
keys share an offset, and part of the config's JSON."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpsa_jax.attention import FPSAConfig, fpsa_attention
from fpsa_jax.attention.quant import center_keys

GRID, TILE = (2, 8, 8), (1, 4, 4)


def _inputs(offset, seed=0):
    kq, kk, kv, km = jax.random.split(jax.random.key(seed), 4)
    shape = (2, 128, 2, 32)
    mu = jax.random.normal(km, (1, 1, 2, 32))  # one offset per (head, channel), every token
    k = jax.random.normal(kk, shape) + offset * mu
    return 1.5 * jax.random.normal(kq, shape), k, jax.random.normal(kv, shape)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _attend(q, k, v, impl="xla", **config):
    return fpsa_attention(q, k, v, grid=GRID, config=FPSAConfig(tile=TILE, **config), impl=impl)


def test_centred_keys_have_zero_mean_over_tokens_and_keep_their_dtype():
    _, k, _ = _inputs(3.0)
    centred = center_keys(k.astype(jnp.bfloat16))
    assert centred.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(center_keys(k)).mean(axis=1), 0.0, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("window", [None, (1, 1, 1)])
def test_without_fp8_smoothing_changes_neither_output_nor_gradients(impl, window):
    q, k, v = _inputs(3.0)

    def loss(q, k, v, smooth_k):
        o = _attend(q, k, v, impl, window=window, smooth_k=smooth_k)
        return jnp.sum(o * jnp.cos(o)), o

    (_, plain), g_plain = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v, False)
    (_, smooth), g_smooth = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v, True)
    # float32: the scores move by q . mean(k) (~10 here) and back; a few ulps of that.
    assert _rel(smooth, plain) < 1e-5
    for a, b in zip(g_smooth, g_plain, strict=True):
        assert _rel(a, b) < 1e-4


def test_with_fp8_smoothing_removes_the_error_a_common_key_offset_adds():
    q, k, v = _inputs(0.0)
    shifted = k + 3.0 * jax.random.normal(jax.random.key(9), (1, 1, 2, 32))
    exact = _attend(q, k, v)  # unquantized; the same for shifted keys
    errors = {
        (name, smooth): _rel(_attend(q, keys, v, quant="fp8", smooth_k=smooth), exact)
        for name, keys in (("plain", k), ("shifted", shifted))
        for smooth in (False, True)
    }
    # The offset costs plain FP8 accuracy (quantization steps grow with the keys' range) ...
    assert errors["shifted", False] > 1.5 * errors["plain", False]
    # ... and centring takes it away: both key sets centre to the same values.
    assert errors["shifted", True] < 1.05 * errors["plain", True]
    assert errors["shifted", True] < 0.7 * errors["shifted", False]


def test_smooth_k_is_in_the_json_and_old_configs_load_without_it():
    cfg = FPSAConfig(tile=(1, 2, 2), quant="fp8", smooth_k=True)
    assert FPSAConfig.from_dict(cfg.to_dict()) == cfg
    older = {k: v for k, v in cfg.to_dict().items() if k != "smooth_k"}
    assert FPSAConfig.from_dict(older).smooth_k is False


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_a_non_bool_smooth_k_is_refused(bad):
    with pytest.raises(ValueError, match="smooth_k must be True or False"):
        FPSAConfig(tile=(1, 2, 2), smooth_k=bad)


def test_float8_keys_cannot_be_centred():
    q, k, v = (x.astype(jnp.float8_e4m3fn) for x in _inputs(0.0))
    with pytest.raises(ValueError, match="smooth_k needs 16- or 32-bit keys"):
        _attend(q, k, v, quant="fp8", smooth_k=True)


def test_an_inf_key_with_smooth_k_stays_finite_under_fp8_as_without_it():
    q, k, v = _inputs(1.0)
    k = k.at[0, 5, 1, 3].set(jnp.inf)
    for smooth in (False, True):
        out = _attend(q, k, v, quant="fp8", smooth_k=smooth)
        assert np.isfinite(np.asarray(out)).all(), smooth
