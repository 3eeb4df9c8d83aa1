"""The optimizer: warmup and cosine values, clipping bound, weight decay, eps 1e-15 in the state,
gradient accumulation at the optimizer level."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fpsa_jax.training import TrainConfig, adamw_hyperparams, learning_rate_at, make_optimizer


def test_warmup_is_linear_from_zero_then_constant():
    c = TrainConfig()  # lr 5e-6, 200 warmup updates
    steps = np.array([0, 1, 100, 199, 200, 201, 10_000])
    want = [0.0, 5e-6 / 200, 2.5e-6, 5e-6 * 199 / 200, 5e-6, 5e-6, 5e-6]
    np.testing.assert_allclose(learning_rate_at(steps, c), want, rtol=1e-6)
    assert float(learning_rate_at(0, c.replace(warmup_steps=0))) == np.float32(5e-6)


def test_cosine_decays_from_the_peak_to_the_floor_after_warmup():
    c = TrainConfig(
        lr_schedule="cosine", warmup_steps=100, total_steps=1100, min_learning_rate=1e-6
    )
    lr = learning_rate_at(np.array([50, 100, 600, 1100, 5000]), c)
    np.testing.assert_allclose(lr, [2.5e-6, 5e-6, 3e-6, 1e-6, 1e-6], rtol=1e-5)


def test_the_optimizer_applies_the_scheduled_learning_rate():
    c = TrainConfig(warmup_steps=4, learning_rate=1e-3, weight_decay=0.0)
    tx = make_optimizer(c)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    for k in range(6):
        grads = {"w": jnp.full(3, 0.5)}
        updates, state = tx.update(grads, state, params)
        # Adam's first moments of a constant gradient: m_hat / sqrt(v_hat) = 1.
        np.testing.assert_allclose(updates["w"], -learning_rate_at(k, c), rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(
            adamw_hyperparams(state, c)["learning_rate"], learning_rate_at(k, c)
        )


def test_eps_is_1e_minus_15_in_the_state_and_in_the_update():
    c = TrainConfig(warmup_steps=0, weight_decay=0.0)
    tx = make_optimizer(c)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    hyper = adamw_hyperparams(state, c)
    assert hyper["eps"] == np.float32(1e-15) and hyper["b1"] == np.float32(0.9)
    assert hyper["b2"] == np.float32(0.999) and hyper["weight_decay"] == 0.0
    # A 1e-12 gradient is far above eps = 1e-15: the first update is ~ -lr (it would be ~ -lr/1e4
    # with torch's default eps 1e-8).
    updates, _ = tx.update({"w": jnp.full(2, 1e-12)}, state, params)
    np.testing.assert_allclose(updates["w"], -5e-6 * 1e-12 / (1e-12 + 1e-15), rtol=1e-4)


def test_clipping_bounds_the_global_norm_before_adam():
    c = TrainConfig(warmup_steps=0)
    tx = make_optimizer(c)
    params = {"a": jnp.zeros(4), "b": jnp.zeros((2, 2))}
    for scale, want_norm in ((10.0, 1.0), (0.5, 0.5)):
        grads = jax.tree.map(lambda p, s=scale: jnp.full(p.shape, s / np.sqrt(8.0)), params)
        _, state = tx.update(grads, tx.init(params), params)
        mu = state[-1].inner_state[0].mu  # Adam's first moment after one step: (1 - b1) * g
        np.testing.assert_allclose(optax.tree.norm(mu) / (1 - 0.9), want_norm, rtol=1e-5)
    unclipped = make_optimizer(c.replace(grad_clip_norm=None))
    _, state = unclipped.update(
        jax.tree.map(lambda p: jnp.full(p.shape, 10.0 / np.sqrt(8.0)), params),
        unclipped.init(params),
        params,
    )
    np.testing.assert_allclose(optax.tree.norm(state[-1].inner_state[0].mu) / 0.1, 10.0, rtol=1e-5)


def test_weight_decay_is_decoupled_and_scaled_by_the_learning_rate():
    c = TrainConfig(warmup_steps=0, learning_rate=1e-3, weight_decay=0.1)
    tx = make_optimizer(c)
    params = {"w": jnp.array([1.0, -2.0, 4.0])}
    updates, _ = tx.update({"w": jnp.zeros(3)}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -1e-3 * 0.1 * params["w"], rtol=1e-6)


@pytest.mark.parametrize("k", [2, 3])
def test_accumulating_k_micro_gradients_equals_one_step_on_their_mean(k):
    c = TrainConfig(warmup_steps=0, learning_rate=1e-2, adam_eps=1e-6)
    params = {"w": jnp.array([0.3, -0.2, 0.1, 0.0])}
    grads = [{"w": jnp.array([0.5, -1.0, 2.0, 0.1]) * (i + 1)} for i in range(k)]
    acc = make_optimizer(c.replace(grad_accum_steps=k))
    state = acc.init(params)
    for i, g in enumerate(grads):
        updates, state = acc.update(g, state, params)
        if i < k - 1:
            np.testing.assert_array_equal(updates["w"], 0.0)  # nothing applied mid-accumulation
    single = make_optimizer(c)
    mean = jax.tree.map(lambda *g: sum(g) / k, *grads)
    want, _ = single.update(mean, single.init(params), params)
    np.testing.assert_allclose(updates["w"], want["w"], rtol=1e-6)
    assert adamw_hyperparams(state, c.replace(grad_accum_steps=k))["eps"] == np.float32(1e-6)
