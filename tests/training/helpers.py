"""A tiny Wan DiT, a synthetic batch and jitted train steps shared by the training tests."""

import functools

import jax
import numpy as np

from fpsa_jax.model.wan import init_params
from fpsa_jax.training import TrainConfig, batch_loss, init_train_state, train_step
from tests.conftest import TINY_WAN

# Latents [B, 2, 8, 8, 4] patchify to the token grid (2, 4, 4): 32 tokens, 8 tiles of (1, 2, 2).
MODEL = TINY_WAN

# A fast-learning test recipe: fixed noise in the batch, no text dropout, no warmup. adam_eps 1e-6
# keeps Adam's first step continuous in the gradient (with 1e-15 it is sign(g) where |g| sits at
# rounding level), so two gradient paths that agree to rounding give matching parameters.
FAST = TrainConfig(
    learning_rate=2e-3,
    warmup_steps=0,
    text_dropout=0.0,
    adam_eps=1e-6,
    compute_dtype="float32",
)

STATIC = ("model_config", "train_config", "attention", "impl")
# On CPU the tests compile with LLVM's optimisations off: the same XLA program (results agree to
# float32 rounding) in about a third of the compile time, which dominates these tests.
_FAST_COMPILE = (
    {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    if jax.default_backend() == "cpu"
    else None
)
jit_train_step = jax.jit(train_step, static_argnames=STATIC, compiler_options=_FAST_COMPILE)
jit_batch_loss = jax.jit(batch_loss, static_argnames=STATIC, compiler_options=_FAST_COMPILE)


@functools.cache
def params(seed=0):
    return init_params(MODEL, jax.random.key(seed))


@functools.cache
def state(train_config=FAST, seed=0):
    """A fresh TrainState (cached: states are immutable and the tests never donate them)."""
    return init_train_state(MODEL, train_config, params(seed), jax.random.key(seed + 100))


def batch(b=2, noise=True, seed=0):
    rng = np.random.default_rng(seed)
    out = {
        "latents": rng.standard_normal((b, 2, 8, 8, MODEL.in_dim)).astype(np.float32),
        "context": rng.standard_normal((b, 5, MODEL.text_dim)).astype(np.float32),
        "sigmas": np.linspace(0.3, 0.8, b).astype(np.float32),
    }
    if noise:
        out["noise"] = rng.standard_normal(out["latents"].shape).astype(np.float32)
    return out


def split_batch(full, i):
    """The i-th single-sample micro-batch of `full`."""
    return {k: v[i : i + 1] for k, v in full.items()}
