"""WanModel behaviour beyond parity: input checks, text padding, remat, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpsa_jax.model.wan import WanModel, init_params
from tests.conftest import TINY_WAN

CFG = TINY_WAN


def _random_params(cfg, seed=0):
    """Fresh params with every leaf randomised (the head is zero at init)."""
    params = init_params(cfg, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [
        x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(tree, noisy)


def _inputs(b=2, f=3, h=10, w=14, lt=5, cfg=CFG, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((b, f, h, w, cfg.in_dim)).astype(np.float32),
        rng.uniform(0, 1000, (b,)).astype(np.float32),
        rng.standard_normal((b, lt, cfg.text_dim)).astype(np.float32),
    )


def test_fresh_model_predicts_zeros_because_the_head_starts_at_zero():
    params = init_params(CFG, jax.random.key(0))
    out = WanModel(CFG).apply({"params": params}, *_inputs())
    assert out.shape == (2, 3, 10, 14, 4) and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_short_context_equals_explicit_zero_padding_and_long_context_is_cut():
    params = _random_params(CFG)
    lat, t, ctx = _inputs(lt=5)
    model = WanModel(CFG)
    padded = np.concatenate([ctx, np.zeros((2, CFG.text_len - 5, CFG.text_dim), np.float32)], 1)
    np.testing.assert_array_equal(
        model.apply({"params": params}, lat, t, ctx),
        model.apply({"params": params}, lat, t, padded),
    )
    longer = np.concatenate([padded, np.ones((2, 4, CFG.text_dim), np.float32)], 1)
    np.testing.assert_array_equal(
        model.apply({"params": params}, lat, t, longer),
        model.apply({"params": params}, lat, t, padded),
    )
    # and the padding is not a no-op: zero rows still pass through text_embedding's biases
    out_short = WanModel(CFG.replace(text_len=5)).apply({"params": params}, lat, t, ctx)
    assert not np.allclose(out_short, model.apply({"params": params}, lat, t, ctx))


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_changes_neither_outputs_nor_gradients(policy):
    params = _random_params(CFG)
    lat, t, ctx = _inputs(b=1, f=2, h=4, w=6)

    def loss(p, cfg):
        return jnp.mean(WanModel(cfg).apply({"params": p}, lat, t, ctx) ** 2)

    base_loss, base_grad = jax.value_and_grad(loss)(params, CFG)
    remat_loss, remat_grad = jax.value_and_grad(loss)(params, CFG.replace(remat=policy))
    np.testing.assert_allclose(remat_loss, base_loss, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), remat_grad, base_grad
    )


def test_bfloat16_compute_stays_close_to_float32():
    params = _random_params(CFG)
    inputs = _inputs()
    ref = WanModel(CFG).apply({"params": params}, *inputs)
    out = WanModel(CFG.replace(dtype="bfloat16")).apply({"params": params}, *inputs)
    assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
    # bf16 keeps 8 mantissa bits (2^-9 relative rounding); a few roundings per layer add up.
    assert float(jnp.abs(out - ref).max() / jnp.abs(ref).max()) < 3e-2


@pytest.mark.parametrize(
    "shape,message",
    [
        ((1, 3, 9, 14, 4), "H=9 is not a multiple of the patch size 2"),
        ((1, 3, 10, 7, 4), "W=7 is not a multiple of the patch size 2"),
        ((1, 3, 10, 14, 16), "latents have 16 channels but the model expects in_dim=4"),
        ((3, 10, 14, 4), r"latents must be \[B, F, H, W, C\]"),
    ],
)
def test_bad_latents_are_rejected_with_the_reason(shape, message):
    params = init_params(CFG, jax.random.key(0))
    _, t, ctx = _inputs(b=shape[0] if len(shape) == 5 else 1)
    with pytest.raises(ValueError, match=message):
        WanModel(CFG).apply({"params": params}, np.zeros(shape, np.float32), t, ctx)


def test_bad_context_and_timesteps_are_rejected():
    params = init_params(CFG, jax.random.key(0))
    lat, t, ctx = _inputs()
    with pytest.raises(ValueError, match="context must be"):
        WanModel(CFG).apply({"params": params}, lat, t, ctx[..., :8])
    with pytest.raises(ValueError, match="timesteps must be"):
        WanModel(CFG).apply({"params": params}, lat, np.zeros((3,), np.float32), ctx)


def test_condition_channels_are_concatenated_after_the_noisy_latents_and_broadcast_over_batch():
    cfg = CFG.replace(in_dim=6, out_dim=4)  # 4 noisy channels + 2 condition channels (like I2V)
    params = _random_params(cfg)
    model = WanModel(cfg, attention_impl="xla")
    full, t, ctx = _inputs(cfg=cfg)
    latents, condition = full[..., :4], full[..., 4:]
    joined = model.apply({"params": params}, full, t, ctx)
    assert joined.shape == (*full.shape[:4], 4)
    split = model.apply({"params": params}, latents, t, ctx, condition=condition)
    np.testing.assert_array_equal(split, joined)
    # a condition of batch 1 is shared by every sample
    shared = np.broadcast_to(condition[:1], condition.shape)
    np.testing.assert_array_equal(
        model.apply({"params": params}, latents, t, ctx, condition=condition[:1]),
        model.apply({"params": params}, latents, t, ctx, condition=shared),
    )
    with pytest.raises(ValueError, match="condition must be"):
        model.apply({"params": params}, latents, t, ctx, condition=condition[:, :2])
    with pytest.raises(ValueError, match="expects in_dim=6"):
        model.apply({"params": params}, latents, t, ctx)
