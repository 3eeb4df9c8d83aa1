"""Sampling the demo model with any schedule, and tracing its attention error per step, on a
small random model (the embedded checkpoints are covered in test_checkpoint and tests/infer)."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from fpsa_jax.attention import FPSAConfig, StepSchedule
from fpsa_jax.config import WanConfig
from fpsa_jax.demo import DemoCheckpoint, Sampling
from fpsa_jax.demo.attention_trace import ErrorLog, mean_over_layers, traced_model_fn
from fpsa_jax.demo.generate import generate, params_as, with_attention
from fpsa_jax.model.random_weights import random_weights
from fpsa_jax.model.wan import init_params

SMALL = WanConfig.preset("demo", dim=32, ffn_dim=64, num_heads=2, num_layers=2)
DEMO = StepSchedule.preset("demo")
CAPTIONS = ["a red square moves left quickly", "a blue circle moves up slowly"]


@pytest.fixture(scope="module")
def checkpoint():
    params = random_weights(functools.partial(init_params, SMALL), jax.random.key(0), std=0.1)
    return DemoCheckpoint(SMALL, jax.device_get(params), DEMO, Sampling(num_steps=4), {})


def test_videos_have_the_demo_shape_and_depend_on_seed_and_caption(checkpoint):
    a = generate(checkpoint, CAPTIONS, [0, 0], num_steps=2, schedule=None)
    assert a.shape == (2, 9, 32, 32, 3) and a.dtype == np.float32
    assert np.isfinite(a).all() and -1 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(
        a, generate(checkpoint, CAPTIONS, [0, 0], num_steps=2, schedule=None)
    )
    b = generate(checkpoint, CAPTIONS, [1, 0], num_steps=2, schedule=None)
    assert not np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], a[1])  # same noise, different caption


def test_the_schedule_reaches_the_model_and_fpsa_changes_the_video(checkpoint):
    fpsa = generate(checkpoint, CAPTIONS[:1], [0], num_steps=4, schedule=checkpoint.schedule)
    dense = generate(checkpoint, CAPTIONS[:1], [0], num_steps=4, schedule=None)
    assert checkpoint.schedule == DEMO and not np.array_equal(fpsa, dense)


def test_none_arguments_take_the_checkpoints_sampling_settings(checkpoint):
    ckpt = dataclasses.replace(checkpoint, sampling=Sampling(num_steps=2, shift=2.0))
    default = generate(ckpt, CAPTIONS[:1], [0], schedule=None)
    np.testing.assert_array_equal(
        default, generate(ckpt, CAPTIONS[:1], [0], schedule=None, num_steps=2, shift=2.0)
    )
    assert not np.array_equal(default, generate(ckpt, CAPTIONS[:1], [0], schedule=None, shift=5.0))


def test_bad_requests_are_refused(checkpoint):
    with pytest.raises(ValueError, match="need one seed per caption"):
        generate(checkpoint, CAPTIONS, [0], schedule=None)
    with pytest.raises(ValueError, match="unknown impl 'nonsense'; valid: auto"):
        generate(checkpoint, CAPTIONS[:1], [0], schedule=None, attention_impl="nonsense")
    with pytest.raises(ValueError, match="schedule must be a StepSchedule or None"):
        generate(checkpoint, CAPTIONS[:1], [0], schedule="demo")


def test_with_attention_changes_every_fpsa_phase_and_keeps_dense_ones():
    mixed = StepSchedule(((0.5, None), (1.0, DEMO.phases[0].config)))
    fp8_only = with_attention(mixed, window=None)
    assert fp8_only.phases[0].config is None
    assert fp8_only.phases[1].config.window is None and fp8_only.phases[1].config.quant == "fp8"
    sparse_only = with_attention(DEMO, quant="none")
    assert [p.config.window for p in sparse_only.phases] == [p.config.window for p in DEMO.phases]
    assert {p.config.quant for p in sparse_only.phases} == {"none"}


def test_trace_reports_each_step_and_layer_without_changing_the_video(checkpoint):
    log = ErrorLog()
    fn = traced_model_fn(SMALL, params_as(checkpoint), log)
    traced = generate(checkpoint, CAPTIONS[:1], [0], num_steps=4, schedule=DEMO, model_fn=fn)
    np.testing.assert_array_equal(
        traced, generate(checkpoint, CAPTIONS[:1], [0], num_steps=4, schedule=DEMO)
    )
    errors = log.per_step(4, SMALL.num_layers)
    assert errors.rel_l2.shape == (4, 2)
    # FP8 + a window keeping 17-67% of the blocks: a real but bounded error. With near-uniform
    # attention (random weights) a window over a fraction f of the keys has rel. L2 about
    # sqrt(1 / f - 1) from dense: 2.2 at the sparsest phase's f = 1/6.
    assert (errors.rel_l2 > 1e-3).all() and (errors.rel_l2 < 2.5).all()
    assert (errors.cosine > 0.5).all() and (errors.cosine <= 1 + 1e-9).all()
    means = mean_over_layers(errors)
    np.testing.assert_allclose(means["rel_l2"], errors.rel_l2.mean(axis=1))
    with pytest.raises(ValueError, match="expected 5 x 2 attention calls, got 8"):
        log.per_step(5, 2)


def test_trace_of_an_operator_equal_to_dense_reports_no_error(checkpoint):
    same = StepSchedule(((1.0, FPSAConfig(tile=(3, 4, 4))),))  # no window, no FP8
    log = ErrorLog()
    fn = traced_model_fn(SMALL, params_as(checkpoint), log)
    generate(checkpoint, CAPTIONS[:1], [0], num_steps=2, schedule=same, model_fn=fn)
    errors = log.per_step(2, SMALL.num_layers)
    assert (errors.rel_l2 < 1e-2).all() and (errors.cosine > 0.9999).all()


def test_fp8_linears_change_the_video_a_little_and_name_the_backend_on_cpu(checkpoint):
    from fpsa_jax.demo.generate import with_linear_quant
    from fpsa_jax.model.fp8_linear import FP8

    fp8 = with_linear_quant(checkpoint, "fp8")
    assert params_as(fp8)["blocks"]["ffn"]["fc1"]["kernel"].dtype == FP8  # quantized once
    dense = generate(checkpoint, CAPTIONS[:1], [0], num_steps=2, schedule=None)
    video = generate(fp8, CAPTIONS[:1], [0], num_steps=2, schedule=None, linear_impl="emulated")
    assert np.isfinite(video).all() and not np.array_equal(video, dense)
    assert np.abs(video - dense).mean() < 0.05 * np.abs(dense).mean()
    with pytest.raises(ValueError, match="the backend is cpu"):
        generate(fp8, CAPTIONS[:1], [0], num_steps=2, schedule=None)
