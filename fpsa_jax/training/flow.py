"""Wan's flow matching: noising, the velocity target, the loss and the training sigma distribution.

Convention (REFERENCE.md, "Sampling"): x_sigma = (1 - sigma) x0 + sigma eps, the model predicts
v = eps - x0 and sees the timestep sigma * 1000 (float, Wan's 0..1000 scale).

Both sigma distributions are a monotone map of a uniform u in [0, 1), sigma = F^-1(u), where F is
the distribution's CDF (`sigma_cdf`, host float64) and F^-1 its inverse (`sigma_from_u`, traced):
  shifted:       F^-1(u) = s u / (1 + (s - 1) u),  F(sigma) = sigma / (s - (s - 1) sigma)
  logit_normal:  F^-1(u) = sigmoid(m + std * Phi^-1(u)),  F(sigma) = Phi((logit(sigma) - m) / std)
Sampling through the inverse CDF is what lets `fpsa_jax.training.phases` restrict u to the sub-range
of one schedule phase without changing the distribution inside it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax.sampling.schedule import NUM_TRAIN_TIMESTEPS
from fpsa_jax.training.config import TrainConfig

Array = jax.Array
_F32 = jnp.float32


def _per_sample(sigmas: Array, ndim: int) -> Array:
    return jnp.asarray(sigmas, _F32).reshape((-1,) + (1,) * (ndim - 1))


def add_noise(x0: Array, noise: Array, sigmas: Array) -> Array:
    """x_sigma = (1 - sigma) x0 + sigma eps, in float32.

    x0, noise: [B, F, H, W, C]; sigmas: [B]. Returns [B, F, H, W, C] float32.
    """
    s = _per_sample(sigmas, x0.ndim)
    return (1.0 - s) * x0.astype(_F32) + s * noise.astype(_F32)


def velocity_target(x0: Array, noise: Array) -> Array:
    """The flow's velocity eps - x0 (float32); x0, noise: [B, F, H, W, C]."""
    return noise.astype(_F32) - x0.astype(_F32)


def timesteps_from_sigmas(sigmas: Array) -> Array:
    """The model's timestep input: sigma * 1000 as float32 [B] (not truncated to ints)."""
    return jnp.asarray(sigmas, _F32) * NUM_TRAIN_TIMESTEPS


def flow_matching_loss(pred: Array, target: Array) -> tuple[Array, Array]:
    """Mean squared error in float32: (scalar mean over the batch, per-sample mean [B]).

    pred, target: [B, F, H, W, C].
    """
    err = jnp.square(pred.astype(_F32) - target.astype(_F32))
    per_sample = err.reshape(err.shape[0], -1).mean(axis=1)
    return per_sample.mean(), per_sample


def sigma_from_u(u: Array, config: TrainConfig) -> Array:
    """The inverse CDF F^-1 of the training sigma distribution, applied to u in [0, 1] (float32)."""
    u = jnp.asarray(u, _F32)
    if config.sigma_sampling == "shifted":
        s = config.sigma_shift
        return s * u / (1.0 + (s - 1.0) * u)
    z = jax.scipy.special.ndtri(u)
    return jax.nn.sigmoid(config.logit_normal_mean + config.logit_normal_std * z)


def sigma_cdf(sigma, config: TrainConfig) -> np.ndarray:
    """The CDF F(sigma) = P(sampled sigma <= sigma) on the host, float64 (scalar or array)."""
    sigma = np.clip(np.asarray(sigma, np.float64), 0.0, 1.0)
    if config.sigma_sampling == "shifted":
        s = config.sigma_shift
        return sigma / (s - (s - 1.0) * sigma)
    with np.errstate(divide="ignore"):
        logit = np.log(sigma) - np.log1p(-sigma)
    z = (logit - config.logit_normal_mean) / config.logit_normal_std
    return 0.5 * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(z / math.sqrt(2.0)))


def sample_sigmas(key: Array, batch: int, config: TrainConfig) -> Array:
    """`batch` i.i.d. training sigmas [B] (float32) from config.sigma_sampling."""
    return sigma_from_u(jax.random.uniform(key, (batch,), _F32), config)
