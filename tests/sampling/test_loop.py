"""The CFG loop: batching, per-phase compilation and configs, determinism, progress, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from fpsa_jax.attention import FPSAConfig, StepSchedule
from fpsa_jax.config import WanConfig
from fpsa_jax.model.fp8_linear import CUBLASLT_COMPILER_OPTIONS
from fpsa_jax.model.wan import WanModel
from fpsa_jax.sampling import (
    Segment,
    flow_schedule,
    sample,
    step_segments,
    unipc_init,
    unipc_step,
    unipc_tables,
    wan_model_fn,
)
from fpsa_jax.sampling.loop import _run_segment, _WanApply, segment_runner
from tests.sampling.reference import reference_sample
from tests.sampling.toy import inputs, rel_err, toy_velocity

A = FPSAConfig(tile=(1, 2, 2), window=(1, 1, 1))
B = FPSAConfig(tile=(1, 2, 2), window=(2, 2, 2))
C = FPSAConfig(tile=(1, 1, 1), window=(1, 1, 1))
THREE_PHASES = StepSchedule(((0.25, A), (0.75, B), (1.0, C)))


def counting_model():
    """A fresh toy model_fn (fresh jit cache key) and the list of (batch, config) of its traces."""
    traces = []

    def model_fn(x, t, ctx, attention):
        traces.append((x.shape[0], attention))
        return toy_velocity(jnp, x, t, ctx, attention)

    return model_fn, traces


def np_model(x, t, ctx, attention):
    return toy_velocity(np, x, t, ctx, attention)


def test_cfg_as_one_batch_of_two_equals_two_separate_calls():
    model_fn, traces = counting_model()
    noise, ctx, neg = inputs(batch=2)
    n, g = 6, 5.0
    got = sample(model_fn, noise, ctx, neg, num_steps=n, shift=5.0, guide_scale=g)
    assert [b for b, _ in traces] == [4]  # one call on [cond; uncond] per step, traced once

    sched = flow_schedule(n, 5.0)
    rows = jnp.asarray(unipc_tables(sched.sigmas), jnp.float32)
    x = jnp.asarray(noise)
    state = unipc_init(x)
    for i in range(n):
        t = jnp.full((2,), float(sched.timesteps[i]), jnp.float32)
        c = toy_velocity(jnp, x, t, jnp.asarray(ctx), None)
        u = toy_velocity(jnp, x, t, jnp.asarray(neg), None)
        x, state = unipc_step(rows[i], state, x, u + g * (c - u))
    assert rel_err(got, x) <= 1e-6


def test_each_step_runs_its_phase_config():
    noise, ctx, neg = inputs()
    n = 8
    kw = dict(num_steps=n, shift=5.0, guide_scale=3.0)
    got = sample(counting_model()[0], noise, ctx, neg, schedule=THREE_PHASES, **kw)
    want = reference_sample(
        np_model,
        noise,
        ctx,
        neg,
        **kw,
        attention_for_step=lambda i: THREE_PHASES.config_for_step(i, n),
    )
    dense = reference_sample(np_model, noise, ctx, neg, **kw)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(dense, want) > 1e-3  # the configs matter in this test


def test_compiles_once_per_distinct_phase_not_per_step():
    noise, ctx, neg = inputs()
    model_fn, traces = counting_model()
    kw = dict(num_steps=8, shift=5.0, guide_scale=3.0)
    sample(model_fn, noise, ctx, neg, schedule=THREE_PHASES, **kw)
    assert [a for _, a in traces] == [A, B, C]
    sample(model_fn, noise, ctx, neg, schedule=THREE_PHASES, **kw)
    sample(model_fn, noise, ctx, neg, schedule=THREE_PHASES, **{**kw, "guide_scale": 6.0})
    assert len(traces) == 3  # a second video, or another guidance scale, compiles nothing


def test_repeated_config_in_separate_segments_compiles_once():
    schedule = StepSchedule(((0.25, A), (0.75, None), (1.0, A)))
    assert step_segments(schedule, 8) == (Segment(0, 2, A), Segment(2, 6, None), Segment(6, 8, A))
    noise, ctx, neg = inputs()
    model_fn, traces = counting_model()
    sample(model_fn, noise, ctx, neg, num_steps=8, shift=5.0, guide_scale=3.0, schedule=schedule)
    assert [a for _, a in traces] == [A, None]


def test_no_schedule_is_dense_every_step_in_one_segment():
    assert step_segments(None, 50) == (Segment(0, 50, None),)
    noise, ctx, neg = inputs()
    model_fn, traces = counting_model()
    sample(model_fn, noise, ctx, neg, num_steps=5, shift=5.0, guide_scale=3.0)
    assert [a for _, a in traces] == [None]


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_sampling_is_deterministic_for_given_noise(solver):
    noise, ctx, neg = inputs(seed=4)
    kw = dict(num_steps=6, shift=5.0, guide_scale=5.0, solver=solver, schedule=THREE_PHASES)
    a = sample(counting_model()[0], noise, ctx, neg, **kw)
    b = sample(counting_model()[0], noise, ctx, neg, **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_progress_hook_reports_every_step_before_sample_returns():
    noise, ctx, neg = inputs()
    seen = []
    sample(
        counting_model()[0],
        noise,
        ctx,
        neg,
        num_steps=7,
        shift=5.0,
        guide_scale=2.0,
        schedule=THREE_PHASES,
        progress=lambda step, n: seen.append((step, n)),
    )
    assert sorted(seen) == [(i, 7) for i in range(1, 8)]


def test_short_negative_context_is_zero_padded_and_batch_one_broadcast():
    noise, ctx, neg = inputs(batch=2, lt=5)
    model_fn = counting_model()[0]
    kw = dict(num_steps=3, shift=5.0, guide_scale=4.0)
    short = neg[:1, :3]
    padded = np.concatenate([short, np.zeros((1, 2, short.shape[2]), np.float32)], axis=1)
    got = sample(model_fn, noise, ctx, short, **kw)
    want = sample(model_fn, noise, ctx, np.concatenate([padded, padded]), **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_wan_model_fn_passes_weights_as_arguments_not_constants():
    cfg = WanConfig.preset("tiny")
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(1, 2, 4, 4, cfg.in_dim)).astype(np.float32)
    ctx = rng.normal(size=(1, 3, cfg.text_dim)).astype(np.float32)
    neg = rng.normal(size=(1, 3, cfg.text_dim)).astype(np.float32)
    model = WanModel(cfg)
    # Random weights everywhere (Wan zero-initialises its head), built from shapes without init.
    shapes = jax.eval_shape(model.init, jax.random.key(0), noise, jnp.zeros((1,)), ctx)["params"]
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(
        treedef,
        [0.1 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys, strict=True)],
    )
    g = 5.0
    kw = dict(num_steps=1, shift=5.0, guide_scale=g)
    got = sample(wan_model_fn(cfg, params), noise, ctx, neg, **kw)
    # One step of UniPC lands on the data prediction: x0 = x - sigma_0 (u + g (c - u)).
    apply = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
    t = jnp.full((1,), float(flow_schedule(1, 5.0).timesteps[0]))
    c, u = apply(params, noise, t, ctx), apply(params, noise, t, neg)
    want = noise - flow_schedule(1, 5.0).sigmas[0] * (u + g * (c - u))
    assert rel_err(got, want) <= 1e-5
    size = _run_segment._cache_size()
    params2 = jax.tree.map(lambda p: p * 0.5, params)
    other = sample(wan_model_fn(cfg, params2), noise, ctx, neg, **kw)
    assert _run_segment._cache_size() == size  # new weights, same program
    assert rel_err(other, got) > 1e-4


def test_wan_model_fn_interceptor_sees_every_call_and_may_sow_without_changing_the_output():
    cfg = WanConfig.preset("tiny", num_layers=1)
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(1, 2, 4, 4, cfg.in_dim)).astype(np.float32)
    ctx = rng.normal(size=(1, 3, cfg.text_dim)).astype(np.float32)
    params = WanModel(cfg).init(jax.random.key(0), noise, jnp.zeros((1,)), ctx)["params"]
    seen, sown = [], []

    def interceptor(next_fun, args, kwargs, context):
        name = type(context.module).__name__
        seen.append(name)
        if name == "FeedForward":
            context.module.sow("intermediates", "probe", jnp.full((), 7.0))
        out = next_fun(*args, **kwargs)
        if name == "WanModel":  # what the layers sowed, stacked over them by the scan
            sown.extend(jax.tree.leaves(context.module.variables["intermediates"]))
        return out

    kw = dict(num_steps=1, shift=5.0, guide_scale=5.0)
    plain = sample(wan_model_fn(cfg, params), noise, ctx, ctx, **kw)
    intercepted = sample(wan_model_fn(cfg, params, interceptor=interceptor), noise, ctx, ctx, **kw)
    np.testing.assert_array_equal(np.asarray(intercepted), np.asarray(plain))
    assert {"WanModel", "Attention", "FeedForward", "Head"} <= set(seen)
    assert sown and all(x.shape == (1,) for x in sown)  # one value per layer, each trace


def test_wan_model_fn_refuses_an_unknown_impl_when_built():
    # No params are read and nothing is traced: the name alone is checked.
    with pytest.raises(ValueError, match="unknown impl 'flash'; valid: auto, reference, xla"):
        wan_model_fn(WanConfig.preset("tiny"), params=None, attention_impl="flash")


def test_wan_model_fn_checks_the_fp8_linears_when_built():
    fp8 = WanConfig.preset("tiny", linear_quant="fp8")
    with pytest.raises(ValueError, match="unknown FP8 linear impl 'fast'; valid:"):
        wan_model_fn(WanConfig.preset("tiny"), params=None, linear_impl="fast")
    with pytest.raises(ValueError, match="FP8 tensor cores .* the backend is cpu"):
        wan_model_fn(fp8, params=None)  # "cublaslt" by default
    wan_model_fn(fp8, params=None, linear_impl="emulated")  # runs anywhere


def test_only_a_model_with_cublaslt_fp8_linears_compiles_with_their_xla_options():
    fp8 = WanConfig.preset("tiny", linear_quant="fp8")
    # Built directly: wan_model_fn refuses "cublaslt" on a CPU before any program exists.
    cublaslt = Partial(_WanApply(fp8, "xla", None, "cublaslt"), None, None)
    runner = segment_runner(cublaslt)
    assert runner is not _run_segment and runner is segment_runner(cublaslt)  # one jit cache
    assert cublaslt.func.compiler_options == CUBLASLT_COMPILER_OPTIONS
    for plain in (
        wan_model_fn(fp8, params=None, linear_impl="emulated"),
        wan_model_fn(WanConfig.preset("tiny"), params=None),
        Partial(toy_velocity, jnp),
    ):
        assert segment_runner(plain) is _run_segment
    # XLA accepts the options on this backend too (they are GPU debug options, ignored here).
    compiled = jax.jit(lambda x: x @ x, compiler_options=CUBLASLT_COMPILER_OPTIONS)
    np.testing.assert_allclose(compiled(jnp.eye(3) * 2), jnp.eye(3) * 4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": 2.0}, "num_steps"),
        ({"shift": -1.0}, "shift"),
        ({"solver": "heun"}, "unknown solver 'heun'; valid: unipc, euler"),
        ({"guide_scale": -1.0}, "guide_scale"),
        ({"guide_scale": float("nan")}, "guide_scale"),
        ({"schedule": A}, "schedule must be a StepSchedule"),
    ],
)
def test_bad_arguments_raise_errors_naming_them(kwargs, match):
    noise, ctx, neg = inputs()
    kw = dict(num_steps=4, shift=5.0, guide_scale=5.0)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sample(counting_model()[0], noise, ctx, neg, **kw)


def test_non_callable_model_is_rejected():
    noise, ctx, neg = inputs()
    with pytest.raises(ValueError, match="model_fn must be callable"):
        sample(None, noise, ctx, neg, num_steps=2, shift=5.0, guide_scale=1.0)


@pytest.mark.parametrize("which", ["noise", "context", "negative_batch", "negative_width"])
def test_bad_shapes_raise_errors_naming_the_input(which):
    noise, ctx, neg = inputs(batch=2)
    args = {"noise": noise, "context": ctx, "negative_context": neg}
    if which == "noise":
        args["noise"] = noise[0]
    elif which == "context":
        args["context"] = ctx[:1]
    elif which == "negative_batch":
        args["negative_context"] = np.concatenate([neg, neg[:1]])
    else:
        args["negative_context"] = neg[..., :3]
    with pytest.raises(ValueError, match=which.split("_")[0]):
        sample(Partial(counting_model()[0]), **args, num_steps=2, shift=5.0, guide_scale=1.0)
