"""`TrainState`: everything a train step reads and writes, as one pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from fpsa_jax.config import WanConfig
from fpsa_jax.model.wan import init_params
from fpsa_jax.training.config import TrainConfig
from fpsa_jax.training.optimizer import make_optimizer


class TrainState(flax.struct.PyTreeNode):
    """The training state (a pytree: jit, shard and checkpoint it whole).

    Attributes:
      step: int32 []: micro-steps taken (train_step calls); optimizer updates = step //
        grad_accum_steps.
      params: the float32 master parameters (WanModel's tree).
      opt_state: the optax state of `make_optimizer(train_config)`.
      ema_params: float32 exponential moving average of params, updated after every optimizer
        update.
      rng: a typed PRNG key; each step splits off its noise and text-dropout keys.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array


def init_train_state(
    model_config: WanConfig, train_config: TrainConfig, params: Any, rng: jax.Array
) -> TrainState:
    """A fresh state: float32 master copies of `params` (any float dtype, e.g. a bf16 checkpoint),
    EMA = params, optimizer state initialised, step 0. Pure (jit it with out_shardings to place
    the state on a mesh).

    Raises ValueError when `params` do not have the parameter shapes of `model_config`.
    """
    _check_params(model_config, params)
    if not jnp.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)  # a raw uint32 key (jax.random.PRNGKey)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    ema = jax.tree.map(jnp.copy, params)  # separate buffers, so the state can be donated
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=make_optimizer(train_config).init(params),
        ema_params=ema,
        rng=rng,
    )


def _check_params(model_config: WanConfig, params: Any) -> None:
    expected = jax.eval_shape(lambda: init_params(model_config, jax.random.key(0)))
    got_paths = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    want_paths = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    fmt = jax.tree_util.keystr
    missing = sorted(fmt(p) for p in want_paths.keys() - got_paths.keys())
    extra = sorted(fmt(p) for p in got_paths.keys() - want_paths.keys())
    if missing or extra:
        raise ValueError(
            f"params do not match the WanConfig's parameter tree: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    for path, want in want_paths.items():
        shape = tuple(jnp.shape(got_paths[path]))
        if shape != want.shape:
            raise ValueError(
                f"params{fmt(path)} has shape {shape}, the WanConfig expects {want.shape}"
            )
