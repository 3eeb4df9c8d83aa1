"""The optimizer of the paper's recipe: clip by global norm, then AdamW on a warmup schedule.

    update = MultiSteps(chain(clip_by_global_norm(grad_clip_norm),
                              inject_hyperparams(adamw)(lr(count), b1, b2, eps, weight_decay)))

MultiSteps (only when grad_accum_steps > 1) averages the micro-batch gradients and applies the inner
chain once every grad_accum_steps calls, so clipping sees the accumulated gradient (as torch does
when it clips after accumulation). `inject_hyperparams` keeps the learning rate, the betas, eps and
the weight decay as arrays in the optimizer state, where checkpoints and logs can read them.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from fpsa_jax.training.config import TrainConfig


def learning_rate_at(step, config: TrainConfig):
    """The learning rate of optimizer update `step` (0-based; an int or an int array).

    Linear warmup lr * step / warmup_steps for step < warmup_steps, then constant, or a cosine from
    lr at warmup_steps to min_learning_rate at total_steps (flat after). Returns float32.
    """
    step = jnp.asarray(step, jnp.float32)
    peak, warmup = config.learning_rate, config.warmup_steps
    warm = peak * step / warmup if warmup > 0 else jnp.full_like(step, peak)
    if config.lr_schedule == "constant":
        after = jnp.full_like(step, peak)
    else:
        frac = jnp.clip((step - warmup) / (config.total_steps - warmup), 0.0, 1.0)
        floor = config.min_learning_rate
        after = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
    return jnp.where(step < warmup, warm, after).astype(jnp.float32)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """The optax transformation of `config` (float32 params in, float32 updates out)."""
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=lambda count: learning_rate_at(count, config),
        b1=config.adam_b1,
        b2=config.adam_b2,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    parts = [adamw]
    if config.grad_clip_norm is not None:
        parts.insert(0, optax.clip_by_global_norm(config.grad_clip_norm))
    tx = optax.chain(*parts)
    if config.grad_accum_steps > 1:
        tx = optax.MultiSteps(
            tx, every_k_schedule=config.grad_accum_steps
        ).gradient_transformation()
    return tx


def optimizer_updated(opt_state, config: TrainConfig):
    """True (a bool array) when the last `update` applied an optimizer step (always without
    accumulation; every grad_accum_steps-th call with it)."""
    if config.grad_accum_steps > 1:
        return jnp.logical_and(opt_state.mini_step == 0, opt_state.gradient_step > 0)
    return jnp.asarray(True)


def adamw_hyperparams(opt_state, config: TrainConfig) -> dict:
    """The AdamW hyper-parameters held in the state: learning_rate, b1, b2, eps, weight_decay."""
    if config.grad_accum_steps > 1:
        opt_state = opt_state.inner_opt_state
    return opt_state[-1].hyperparams
