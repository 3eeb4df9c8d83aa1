"""TrainConfig: the paper's defaults, JSON round trip with a nested schedule, validation."""

import json

import pytest

from fpsa_jax.attention import FPSAConfig, StepSchedule
from fpsa_jax.training import TrainConfig


def test_defaults_are_the_papers_recipe():
    c = TrainConfig()
    assert (c.learning_rate, c.warmup_steps, c.lr_schedule) == (5e-6, 200, "constant")
    assert (c.weight_decay, c.adam_b1, c.adam_b2, c.adam_eps) == (1e-4, 0.9, 0.999, 1e-15)
    assert (c.grad_clip_norm, c.ema_decay, c.text_dropout, c.grad_accum_steps) == (
        1.0,
        0.99,
        0.1,
        1,
    )
    assert (c.sigma_sampling, c.sigma_shift) == ("shifted", 5.0)
    assert (c.logit_normal_mean, c.logit_normal_std) == (0.0, 1.0)
    assert (c.compute_dtype, c.num_inference_steps, c.inference_shift) == ("bfloat16", 50, 5.0)
    assert c.schedule is None and c.num_phases == 1


@pytest.mark.parametrize("schedule", [None, StepSchedule.preset("wan-480p")])
def test_json_round_trip_keeps_every_field_and_the_schedule(schedule):
    c = TrainConfig(
        lr_schedule="cosine",
        total_steps=1000,
        min_learning_rate=1e-7,
        sigma_sampling="logit_normal",
        grad_clip_norm=None,
        schedule=schedule,
    )
    text = c.to_json()
    json.loads(text)  # plain JSON
    back = TrainConfig.from_json(text)
    assert back == c and hash(back) == hash(c)
    if schedule is not None:
        assert back.schedule.phases[1].config == FPSAConfig(
            tile=(3, 8, 8), window=(5, 4, 5), quant="fp8"
        )
        assert back.num_phases == 3


def test_from_dict_rejects_unknown_fields_and_fills_defaults():
    with pytest.raises(ValueError, match="unknown TrainConfig fields \\['lr'\\]"):
        TrainConfig.from_dict({"lr": 1e-4})
    assert TrainConfig.from_dict({"warmup_steps": 10}) == TrainConfig(warmup_steps=10)


@pytest.mark.parametrize(
    "field, value",
    [
        ("learning_rate", 0.0),
        ("learning_rate", "5e-6"),
        ("warmup_steps", -1),
        ("warmup_steps", 2.5),
        ("lr_schedule", "linear"),
        ("total_steps", 0),
        ("min_learning_rate", 1.0),
        ("weight_decay", -1e-4),
        ("adam_b1", 1.0),
        ("adam_b2", -0.1),
        ("adam_eps", 0.0),
        ("grad_clip_norm", 0.0),
        ("ema_decay", 1.5),
        ("text_dropout", 1.1),
        ("text_dropout", float("nan")),
        ("grad_accum_steps", 0),
        ("grad_accum_steps", True),
        ("sigma_sampling", "uniform"),
        ("sigma_shift", 0.0),
        ("logit_normal_mean", float("inf")),
        ("logit_normal_std", 0.0),
        ("compute_dtype", "float16"),
        ("cast_params", 1),
        ("num_inference_steps", 0),
        ("inference_shift", -5.0),
        ("schedule", "wan-480p"),
    ],
)
def test_bad_field_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


def test_cosine_needs_total_steps_beyond_the_warmup():
    with pytest.raises(ValueError, match="TrainConfig.total_steps"):
        TrainConfig(lr_schedule="cosine")
    with pytest.raises(ValueError, match="TrainConfig.total_steps"):
        TrainConfig(lr_schedule="cosine", warmup_steps=200, total_steps=200)


def test_inference_schedule_that_is_not_strictly_decreasing_raises():
    with pytest.raises(ValueError, match="TrainConfig.inference_shift"):
        TrainConfig(inference_shift=1e9, num_inference_steps=1000)
