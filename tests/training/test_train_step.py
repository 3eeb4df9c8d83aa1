"""The train step on a tiny Wan DiT: it learns (float32 and bf16 compute), EMA, accumulation,
FP8 + sparse attention, determinism and text dropout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fpsa_jax.attention import FPSAConfig
from fpsa_jax.training import TrainConfig, drop_text, init_train_state
from tests.training import helpers as h

# Token grid (2, 4, 4) in tiles of (1, 2, 2): a (2, 2, 2) tile grid; window (1, 1, 1) keeps 1/8.
FP8_WINDOWED = FPSAConfig(tile=(1, 2, 2), window=(1, 1, 1), quant="fp8", q_group=(1, 2, 2))


def run(train_config, batch, attention=None, steps=1, state=None):
    state = h.state(train_config) if state is None else state
    history = []
    for _ in range(steps):
        state, metrics = h.jit_train_step(
            state, batch, model_config=h.MODEL, train_config=train_config, attention=attention
        )
        history.append(jax.tree.map(float, metrics))
    return state, history


@functools.cache
def dense_first_step():
    return run(h.FAST, h.batch())


def assert_trees_close(a, b, **tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_loss_falls_by_a_fifth_within_30_steps_on_a_fixed_batch(compute_dtype):
    config = h.FAST.replace(compute_dtype=compute_dtype)
    _, history = run(config, h.batch(), steps=31)
    first, last = history[0]["loss"], history[-1]["loss"]
    assert np.isfinite(last) and last < 0.8 * first, (first, last)
    assert all(np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in history)
    assert history[0]["learning_rate"] == np.float32(2e-3)


def test_grad_norm_metric_is_the_norm_before_clipping():
    state, metrics = dense_first_step()
    applied = optax.tree.norm(state.opt_state[-1].inner_state[0].mu) / (1 - 0.9)
    grad_norm = metrics[0]["grad_norm"]
    np.testing.assert_allclose(applied, min(grad_norm, h.FAST.grad_clip_norm), rtol=1e-5)


def test_ema_after_one_step_is_decay_times_old_plus_one_minus_decay_times_new():
    start = h.state()
    new, _ = dense_first_step()
    want = jax.tree.map(lambda p0, p1: 0.99 * p0 + 0.01 * p1, start.params, new.params)
    assert_trees_close(new.ema_params, want, rtol=1e-6, atol=1e-9)
    assert int(new.step) == 1
    assert jax.tree.all(jax.tree.map(lambda p: p.dtype == jnp.float32, new.params))
    assert jax.tree.all(jax.tree.map(lambda p: p.dtype == jnp.float32, new.ema_params))


def test_two_accumulated_micro_batches_equal_one_batch_of_two():
    full = h.batch(b=2)
    one_state, one_metrics = dense_first_step()
    acc_config = h.FAST.replace(grad_accum_steps=2)
    mid, m0 = run(acc_config, h.split_batch(full, 0))
    # Mid-accumulation: parameters and EMA untouched.
    assert_trees_close(mid.params, h.state().params, rtol=0, atol=0)
    assert_trees_close(mid.ema_params, h.state().params, rtol=0, atol=0)
    acc_state, m1 = run(acc_config, h.split_batch(full, 1), state=mid)
    assert int(acc_state.step) == 2
    np.testing.assert_allclose(
        (m0[0]["loss"] + m1[0]["loss"]) / 2, one_metrics[0]["loss"], rtol=1e-5
    )
    # Adam's first moment is (1 - b1) times the applied gradient: the averages agree.
    mu_acc = acc_state.opt_state.inner_opt_state[-1].inner_state[0].mu
    mu_one = one_state.opt_state[-1].inner_state[0].mu
    assert_trees_close(mu_acc, mu_one, rtol=1e-4, atol=1e-9)
    assert_trees_close(acc_state.params, one_state.params, rtol=1e-5, atol=1e-7)
    assert_trees_close(acc_state.ema_params, one_state.ema_params, rtol=1e-5, atol=1e-7)
    assert m0[0]["learning_rate"] == m1[0]["learning_rate"] == one_metrics[0]["learning_rate"]


def test_fp8_windowed_step_runs_with_finite_gradients_that_differ_from_dense():
    dense_state, dense_metrics = dense_first_step()
    fp8_state, fp8_metrics = run(h.FAST, h.batch(), attention=FP8_WINDOWED)
    assert np.isfinite(fp8_metrics[0]["loss"]) and np.isfinite(fp8_metrics[0]["grad_norm"])
    grads_fp8 = fp8_state.opt_state[-1].inner_state[0].mu
    grads_dense = dense_state.opt_state[-1].inner_state[0].mu
    assert jax.tree.all(jax.tree.map(lambda g: bool(np.isfinite(g).all()), grads_fp8))
    # The head starts at zero, so on step 0 only the head has a gradient; it differs because the
    # head's input features went through the attention. From step 1 on every parameter has one.
    diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), grads_fp8, grads_dense)
    assert max(jax.tree.leaves(diff)) > 0
    _, fp8_next = run(h.FAST, h.batch(), attention=FP8_WINDOWED, state=fp8_state)
    _, dense_next = run(h.FAST, h.batch(), state=dense_state)
    assert fp8_next[0]["loss"] != dense_next[0]["loss"]
    assert abs(fp8_next[0]["grad_norm"] - dense_next[0]["grad_norm"]) > 1e-4


def test_train_step_is_deterministic_given_the_state():
    start = h.state()
    a, ma = run(h.FAST, h.batch(), attention=FP8_WINDOWED, state=start)
    b, mb = run(h.FAST, h.batch(), attention=FP8_WINDOWED, state=start)
    assert ma == mb
    assert_trees_close(a.params, b.params, rtol=0, atol=0)
    assert_trees_close(a.opt_state, b.opt_state, rtol=0, atol=0)
    assert not np.array_equal(jax.random.key_data(a.rng), jax.random.key_data(start.rng))
    np.testing.assert_array_equal(jax.random.key_data(a.rng), jax.random.key_data(b.rng))


@functools.cache
def trained_params():
    """Parameters after 3 steps: the head is no longer zero, so the whole model matters."""
    return run(h.FAST, h.batch(), steps=3)[0].params


def test_bf16_compute_with_or_without_the_parameter_cast_stays_near_float32():
    """cast_params=True casts every weight to bf16 (float32 islands included); False lets layers
    cast at use. Both are bf16 approximations of the float32 loss, and they differ."""
    batch, rng = h.batch(), jax.random.key(0)
    fn = lambda cfg: float(  # noqa: E731
        h.jit_batch_loss(
            trained_params(), batch, rng, model_config=h.MODEL, train_config=cfg, attention=None
        )[0]
    )
    ref = fn(h.FAST)
    cast = fn(h.FAST.replace(compute_dtype="bfloat16"))
    no_cast = fn(h.FAST.replace(compute_dtype="bfloat16", cast_params=False))
    np.testing.assert_allclose([cast, no_cast], ref, rtol=2e-2)
    assert cast != no_cast and cast != ref


def test_text_dropout_at_rate_one_equals_a_zero_context():
    """Noise comes from the rng here (the batch carries none): the same rng draws the same noise."""
    trained = trained_params()
    batch = h.batch(noise=False)
    zero = dict(batch, context=np.zeros_like(batch["context"]))
    rng = jax.random.key(3)
    fn = lambda cfg, b, key: float(  # noqa: E731
        h.jit_batch_loss(trained, b, key, model_config=h.MODEL, train_config=cfg, attention=None)[0]
    )
    dropped = fn(h.FAST.replace(text_dropout=1.0), batch, rng)
    assert dropped == fn(h.FAST, zero, rng)
    assert dropped != fn(h.FAST, batch, rng)  # the context matters to this model
    assert fn(h.FAST, zero, rng) != fn(h.FAST, zero, jax.random.key(4))  # the rng draws the noise


def test_drop_text_substitutes_the_null_context_per_sample():
    ctx = jnp.arange(4 * 3 * 2, dtype=jnp.float32).reshape(4, 3, 2) + 1
    null = -jnp.ones((3, 2))
    out = drop_text(jax.random.key(0), ctx, 0.5, null)
    dropped = np.asarray((out == -1).all(axis=(1, 2)))
    kept = np.asarray((out == ctx).all(axis=(1, 2)))
    assert (dropped ^ kept).all()
    np.testing.assert_array_equal(drop_text(jax.random.key(0), ctx, 1.0), 0.0)
    assert drop_text(jax.random.key(0), ctx, 0.0, null) is ctx
    many = drop_text(jax.random.key(1), jnp.ones((4000, 1, 1)), 0.1)
    assert abs(float((many == 0).mean()) - 0.1) < 4 * np.sqrt(0.09 / 4000)


def test_init_train_state_makes_float32_masters_and_rejects_mismatched_params():
    bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), h.params())
    state = init_train_state(h.MODEL, TrainConfig(), bf16, jax.random.PRNGKey(0))
    assert jax.tree.all(jax.tree.map(lambda p: p.dtype == jnp.float32, state.params))
    assert jnp.issubdtype(state.rng.dtype, jax.dtypes.prng_key)
    with pytest.raises(ValueError, match="has shape"):
        init_train_state(
            h.MODEL.replace(dim=36, num_heads=3), TrainConfig(), h.params(), jax.random.key(0)
        )
    with pytest.raises(ValueError, match="unexpected \\[.*norm_q"):
        init_train_state(
            h.MODEL.replace(num_layers=2, qk_norm=False),
            TrainConfig(),
            h.params(),
            jax.random.key(0),
        )


def test_fp8_linears_train_with_straight_through_gradients_close_to_float():
    # Random params (a fresh head is zero, which would leave only the head with a gradient).
    params = jax.tree.map(
        lambda p: p + 0.05 * np.sin(np.arange(p.size)).reshape(p.shape), h.params()
    )
    batch, rng = h.batch(), jax.random.key(3)

    def grads(model_config):
        loss = lambda p: h.batch_loss(  # noqa: E731
            p, batch, rng, model_config=model_config, train_config=h.FAST, attention=None
        )[0]
        return jax.value_and_grad(loss)(params)

    (loss, g), (loss8, g8) = grads(h.MODEL), grads(h.MODEL.replace(linear_quant="fp8"))
    flat, flat8 = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (g, g8))
    assert np.isfinite(flat8).all() and loss8 != loss
    # E4M3 changes each linear's output by ~2%; the straight-through gradient follows the float
    # one that closely (cosine ~1 - 1e-4), unlike a rounding with zero gradient (cosine ~0).
    cosine = flat @ flat8 / np.linalg.norm(flat) / np.linalg.norm(flat8)
    assert 0.99 < cosine < 1 - 1e-7, cosine
    ffn = g8["blocks"]["ffn"]["fc1"]["kernel"]
    assert np.abs(ffn).max() > 1e-2 * np.abs(g["blocks"]["ffn"]["fc1"]["kernel"]).max()
