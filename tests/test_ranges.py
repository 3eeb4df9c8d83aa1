"""`fpsa_jax.ranges.Range`, the one wording of every numeric range, and `fpsa_jax.cli`'s flag
range checks that the apps declare with it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from absl import app, flags

from fpsa_jax import cli
from fpsa_jax.ranges import Range
from fpsa_jax.training import TrainConfig


@pytest.mark.parametrize(
    "allowed, text",
    [
        (Range(0, lo_open=True), "a finite number > 0"),
        (Range(0), "a finite number >= 0"),
        (Range(0, 1, hi_open=True), "a finite number in [0, 1)"),
        (Range(hi=2**63, hi_open=True, integer=True), "an int < 2^63"),
        (Range(1, integer=True), "an int >= 1"),
        (Range(), "a finite number"),
    ],
)
def test_range_text(allowed, text):
    assert allowed.text == text


def test_only_finite_numbers_of_the_kind_are_in_a_range():
    positive = Range(0, lo_open=True)
    assert 1e-30 in positive and np.float32(2.0) in positive
    for value in (0.0, -1.0, math.nan, math.inf, True, "1", None):
        assert value not in positive
    assert math.nan not in Range() and -math.inf not in Range()
    counts = Range(1, integer=True)
    assert 3 in counts and np.int64(3) in counts and 1.0 not in counts and 0 not in counts
    assert Range(0, 1).check("p", 1) == 1.0 and isinstance(counts.check("n", np.int64(2)), int)
    with pytest.raises(ValueError, match=r"^p must be a finite number in \[0, 1\], got nan$"):
        Range(0, 1).check("p", math.nan)


def test_train_config_says_finite_and_its_range_without_contradiction():
    """Before: "must be finite in (0.0, inf]" (an inf that is not finite, in the range)."""
    with pytest.raises(ValueError) as e:
        TrainConfig(learning_rate=math.inf)
    assert str(e.value) == "TrainConfig.learning_rate must be a finite number > 0, got inf"
    with pytest.raises(
        ValueError, match=r"TrainConfig.adam_b1 must be a finite number in \[0, 1\)"
    ):
        TrainConfig(adam_b1=1.0)
    with pytest.raises(ValueError, match=r"^TrainConfig.warmup_steps must be an int >= 0, got -1$"):
        TrainConfig(warmup_steps=-1)


def test_check_flags_names_the_first_flag_out_of_range(monkeypatch):
    values = flags.FlagValues()
    shift = flags.DEFINE_float("shift", None, "", flag_values=values)
    steps = flags.DEFINE_integer("steps", 1, "", flag_values=values)
    seed = flags.DEFINE_integer("seed", 0, "", flag_values=values)
    monkeypatch.setattr(cli, "_CHECKS", [])
    cli.check_range(shift, Range(0, lo_open=True))
    cli.check_range(steps, Range(1, integer=True))
    cli.check_range(seed, Range(hi=2**63, hi_open=True, integer=True), " (negative: random)")
    values(["prog"])
    cli.check_flags()  # None ("the model's own") and the defaults pass
    for argv, message in [
        (["--shift=nan"], "--shift must be a finite number > 0, got nan"),
        (["--shift=inf"], "--shift must be a finite number > 0, got inf"),
        (["--steps=0"], "--steps must be >= 1, got 0"),
        (
            ["--seed=9223372036854775808"],
            "--seed must be < 2^63 (negative: random), got 9223372036854775808",
        ),
    ]:
        values.unparse_flags()
        values(["prog", *argv])
        with pytest.raises(app.UsageError) as e:
            cli.check_flags()
        assert str(e.value) == message
