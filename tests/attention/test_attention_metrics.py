"""Per-head error metrics against known values and dense references."""

import math

import numpy as np
import pytest
from fpsa_testlib import numpy_attention, random_qkv

from fpsa_jax.attention import FPSAConfig, error_report, fpsa_attention
from fpsa_jax.attention.metrics import compare, dense_reference_f64


def test_metrics_of_known_perturbations():
    ref = np.ones((1, 4, 2, 3))
    out = ref.copy()
    out[..., 1, :] *= 1.1  # head 1: 10% too large everywhere
    m = compare(out, ref)
    np.testing.assert_allclose(m.rel_l2, [0.0, 0.1], atol=1e-6)
    np.testing.assert_allclose(m.cosine, [1.0, 1.0], atol=1e-6)
    assert m.snr_db[0] == np.inf
    np.testing.assert_allclose(m.snr_db[1], 20.0, atol=1e-4)  # 10 log10(1 / 0.01)
    flipped = compare(-ref, ref)
    np.testing.assert_allclose(flipped.cosine, [-1.0, -1.0])


def test_report_against_dense_references():
    q, k, v = random_qkv(0, (1, 48, 3, 16))
    np.testing.assert_allclose(
        dense_reference_f64(q, k, v, chunk=20), numpy_attention(q, k, v, 0.25)
    )
    dense = fpsa_attention(q, k, v, grid=(3, 4, 4), config=None, impl="xla")
    sparse = fpsa_attention(
        q, k, v, grid=(3, 4, 4), config=FPSAConfig(tile=(1, 2, 2), window=(1, 1, 1), quant="fp8")
    )
    r_dense, r_sparse = error_report(dense, q, k, v), error_report(sparse, q, k, v)
    assert r_dense["f64"].rel_l2.shape == (3,)
    assert np.all(r_dense["f64"].rel_l2 < 1e-5)
    assert np.all(r_dense["bf16"].rel_l2 < 2e-2)  # bf16 inputs: ~2^-8 relative per element
    assert np.all(r_sparse["f64"].rel_l2 > 10 * r_dense["f64"].rel_l2)
    assert np.all(r_sparse["f64"].snr_db < r_dense["f64"].snr_db)
    assert math.isclose(float(np.mean(r_dense["f64"].cosine)), 1.0, abs_tol=1e-9)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="must both be"):
        compare(np.ones((1, 2, 3, 4)), np.ones((1, 2, 3, 5)))


def test_error_sums_on_the_device_give_the_host_errors_and_add_over_batches():
    import jax

    from fpsa_jax.attention.metrics import error_sums, errors_from_sums

    rng = np.random.default_rng(0)
    out, ref = rng.normal(size=(2, 2, 8, 3, 4)), rng.normal(size=(2, 2, 8, 3, 4))
    sums = [np.asarray(jax.jit(error_sums)(o, r)) for o, r in zip(out, ref, strict=True)]
    assert sums[0].shape == (4, 3) and sums[0].dtype == np.float32
    host = compare(np.concatenate(out), np.concatenate(ref))  # both batches at once
    pooled = errors_from_sums(sums[0] + sums[1])
    for name in ("rel_l2", "cosine", "snr_db"):
        np.testing.assert_allclose(getattr(pooled, name), getattr(host, name), rtol=1e-5)
    with pytest.raises(ValueError, match="must both be"):
        error_sums(np.ones((1, 2, 3, 4)), np.ones((1, 2, 3)))
