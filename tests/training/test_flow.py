"""Flow matching against NumPy, and the sigma samplers against their analytic CDFs."""

import math

import jax
import numpy as np
import pytest

from fpsa_jax.training import (
    TrainConfig,
    add_noise,
    flow_matching_loss,
    sample_sigmas,
    sigma_cdf,
    sigma_from_u,
    timesteps_from_sigmas,
    velocity_target,
)

SHIFTED = TrainConfig(sigma_sampling="shifted", sigma_shift=5.0)
LOGIT_NORMAL = TrainConfig(
    sigma_sampling="logit_normal", logit_normal_mean=0.3, logit_normal_std=0.8
)


def analytic_cdf(sigma, config):
    """Independent of the library: the CDFs written out from their definitions (float64)."""
    sigma = np.asarray(sigma, np.float64)
    if config.sigma_sampling == "shifted":
        # sigma = s u / (1 + (s - 1) u)  <=>  u = sigma / (s - (s - 1) sigma)
        s = config.sigma_shift
        return sigma / (s - (s - 1) * sigma)
    with np.errstate(divide="ignore"):
        z = (np.log(sigma / (1 - sigma)) - config.logit_normal_mean) / config.logit_normal_std
    phi = [0.5 * math.erfc(-x / math.sqrt(2)) for x in np.ravel(z)]
    return np.reshape(phi, np.shape(z))


def ks_statistic(samples, cdf):
    """sup_x |F_n(x) - F(x)| of the samples against the CDF values of the sorted samples."""
    x = np.sort(np.asarray(samples, np.float64))
    f = cdf(x)
    n = x.size
    return max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n))


# KS critical value at level 0.001: P(sqrt(n) D_n > 1.95) ~= 0.001 for i.i.d. samples of F.
KS_C = 1.95


def test_noising_and_target_match_numpy():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 2, 4, 6, 5)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    sig = np.array([0.0, 0.25, 0.999], np.float32)
    want = (1 - sig[:, None, None, None, None]) * x0 + sig[:, None, None, None, None] * eps
    np.testing.assert_allclose(add_noise(x0, eps, sig), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(add_noise(x0, eps, sig)[0], x0[0])  # sigma 0: clean
    np.testing.assert_allclose(velocity_target(x0, eps), eps - x0, rtol=1e-6, atol=1e-6)


def test_timesteps_are_sigma_times_1000_as_floats():
    t = timesteps_from_sigmas(np.array([0.0, 0.5, 0.12345], np.float32))
    assert t.dtype == np.float32
    np.testing.assert_allclose(t, [0.0, 500.0, 123.45], rtol=1e-6)


def test_loss_is_the_per_sample_mean_squared_error_averaged_over_the_batch():
    rng = np.random.default_rng(1)
    pred = rng.standard_normal((2, 3, 4, 4, 2)).astype(np.float32)
    target = rng.standard_normal(pred.shape).astype(np.float32)
    loss, per_sample = flow_matching_loss(pred.astype(np.float16), target)
    want = ((pred.astype(np.float16).astype(np.float64) - target) ** 2).reshape(2, -1).mean(1)
    assert per_sample.dtype == np.float32 and loss.shape == ()
    np.testing.assert_allclose(per_sample, want, rtol=1e-5)
    np.testing.assert_allclose(loss, want.mean(), rtol=1e-5)


@pytest.mark.parametrize("config", [SHIFTED, LOGIT_NORMAL], ids=["shifted", "logit_normal"])
def test_sampled_sigmas_follow_the_analytic_cdf(config):
    n = 200_000
    s = np.asarray(sample_sigmas(jax.random.key(0), n, config))
    assert s.dtype == np.float32 and s.shape == (n,)
    assert s.min() >= 0.0 and s.max() < 1.0
    assert ks_statistic(s, lambda x: analytic_cdf(x, config)) < KS_C / math.sqrt(n)


def test_ks_check_detects_a_different_shift():
    """The tolerance is tight enough to tell shift 5 from shift 4 (the check has power)."""
    n = 200_000
    s = np.asarray(sample_sigmas(jax.random.key(0), n, SHIFTED))
    other = SHIFTED.replace(sigma_shift=4.0)
    assert ks_statistic(s, lambda x: analytic_cdf(x, other)) > 5 * KS_C / math.sqrt(n)


@pytest.mark.parametrize("config", [SHIFTED, LOGIT_NORMAL], ids=["shifted", "logit_normal"])
def test_cdf_inverts_the_sampler_map(config):
    u = np.linspace(0.001, 0.999, 101)
    sigma = np.asarray(sigma_from_u(u, config), np.float64)
    np.testing.assert_allclose(sigma_cdf(sigma, config), u, atol=2e-6)
    np.testing.assert_allclose(sigma_cdf(sigma, config), analytic_cdf(sigma, config), atol=1e-12)
    np.testing.assert_array_equal(sigma_cdf([0.0, 1.0], config), [0.0, 1.0])
