"""One quantization-aware flow-matching train step (pure; the caller jits it).

The FPSA operator of the step is static (`attention`): the app draws a batch's phase, sigmas and
operator with `sample_phase` and calls the train step compiled for that operator, one compilation
per phase. FP8 quantization passes gradients straight through and sparsity masks them exactly:
both come from the operator (impl "xla" is differentiable). With `model_config.linear_quant ==
"fp8"` the block linears are fake-quantized the same way (`fpsa_jax.model.fp8_linear`, impl
"emulated": E4M3 values forward, the identity's gradient backward), from the float masters at
every step.

Batch (a dict):
  latents       [B, F, H, W, C] float32 clean latents x0 (C = out_dim)
  context       [B, Lt, text_dim] text embeddings
  sigmas        [B] float32 noise levels, drawn outside (phase grouping happens there)
  condition     optional [B or 1, F, H, W, C']: channels the model sees beside the noisy latents
                (WanModel's `condition`, Wan I2V's y; C + C' = in_dim), never noised
  noise         optional [B, F, H, W, C]: the noise eps (default: drawn from the state's rng)
  null_context  optional [Lt, text_dim] or [B, Lt, text_dim]: what text dropout substitutes
                (default zeros; see `drop_text`)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fpsa_jax.attention import FPSAConfig, Impl
from fpsa_jax.config import WanConfig
from fpsa_jax.model.wan import WanModel
from fpsa_jax.training.config import TrainConfig
from fpsa_jax.training.flow import (
    add_noise,
    flow_matching_loss,
    timesteps_from_sigmas,
    velocity_target,
)
from fpsa_jax.training.optimizer import learning_rate_at, make_optimizer, optimizer_updated
from fpsa_jax.training.state import TrainState

Array = jax.Array
Batch = dict[str, Array]


def drop_text(key: Array, context: Array, rate: float, null_context: Array | None = None) -> Array:
    """Replaces each sample's context by `null_context` with probability `rate`.

    context: [B, Lt, text_dim]; null_context: [Lt, text_dim] or [B, Lt, text_dim], default zeros.
    Zeros stand for the empty prompt: the DiT zero-pads text to text_len, so a zero context is a
    prompt with no tokens, an approximation of UMT5's embedding of "" (one EOS row). Wan's
    sampler uses the (default) negative prompt as the unconditional input; to train that exact
    null, pass its precomputed embedding as the batch's `null_context`.
    """
    if rate == 0.0:
        return context
    null = jnp.zeros_like(context) if null_context is None else null_context
    null = jnp.broadcast_to(jnp.asarray(null, context.dtype), context.shape)
    drop = jax.random.bernoulli(key, rate, (context.shape[0],))
    return jnp.where(drop[:, None, None], null, context)


def batch_loss(
    params: Any,
    batch: Batch,
    rng: Array,
    *,
    model_config: WanConfig,
    train_config: TrainConfig,
    attention: FPSAConfig | None,
    impl: Impl = "xla",
) -> tuple[Array, Array]:
    """The flow-matching loss of `batch` under `params`: (scalar, per-sample [B]), float32.

    rng draws the noise (unless the batch carries it) and the text dropout. The forward runs in
    train_config.compute_dtype; with cast_params the float32 params are cast to it first (the
    cast is inside the differentiated function, so gradients are float32 w.r.t. the masters).
    """
    noise_key, drop_key = jax.random.split(rng)
    x0 = jnp.asarray(batch["latents"], jnp.float32)
    noise = batch.get("noise")
    if noise is None:
        noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    sigmas = jnp.asarray(batch["sigmas"], jnp.float32)
    context = drop_text(
        drop_key, batch["context"], train_config.text_dropout, batch.get("null_context")
    )
    dtype = jnp.dtype(train_config.compute_dtype)
    if train_config.cast_params:
        params = jax.tree.map(lambda p: p.astype(dtype), params)
    model = WanModel(
        model_config.replace(dtype=train_config.compute_dtype),
        attention_impl=impl,
        linear_impl="emulated",  # fake quantization with straight-through gradients
    )
    pred = model.apply(
        {"params": params},
        add_noise(x0, noise, sigmas),
        timesteps_from_sigmas(sigmas),
        context,
        attention=attention,
        condition=batch.get("condition"),
    )
    return flow_matching_loss(pred, velocity_target(x0, noise))


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model_config: WanConfig,
    train_config: TrainConfig,
    attention: FPSAConfig | None,
    impl: Impl = "xla",
) -> tuple[TrainState, dict[str, Array]]:
    """One micro-step: loss and gradients, optimizer update (every grad_accum_steps calls), EMA.

    Pure and deterministic given (state, batch). Jit it with model_config, train_config,
    attention and impl static, e.g.
      jax.jit(train_step, static_argnames=("model_config", "train_config", "attention", "impl"),
              donate_argnums=0)
    Returns the new state and float32 scalar metrics: loss (before the update), grad_norm (of
    this micro-batch's gradient, before clipping), learning_rate (of the update this micro-step
    contributes to).
    """
    rng, step_rng = jax.random.split(state.rng)
    loss_fn = lambda p: batch_loss(  # noqa: E731
        p,
        batch,
        step_rng,
        model_config=model_config,
        train_config=train_config,
        attention=attention,
        impl=impl,
    )
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    tx = make_optimizer(train_config)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    decay = train_config.ema_decay
    updated = optimizer_updated(opt_state, train_config)
    ema_params = jax.tree.map(
        lambda e, p: jnp.where(updated, decay * e + (1.0 - decay) * p, e),
        state.ema_params,
        params,
    )
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": learning_rate_at(
            state.step // train_config.grad_accum_steps, train_config
        ),
    }
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params, rng=rng
    )
    return new_state, metrics
