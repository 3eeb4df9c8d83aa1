"""Wan's sigmas and timesteps against an independent re-derivation of set_timesteps."""

import numpy as np
import pytest

from fpsa_jax.sampling import flow_schedule
from tests.sampling.reference import wan_schedule


@pytest.mark.parametrize(
    "num_steps,shift", [(50, 5.0), (10, 1.0), (10, 8.0), (1, 5.0), (2, 3.0), (40, 12.0)]
)
def test_sigmas_and_timesteps_match_wan(num_steps, shift):
    sched = flow_schedule(num_steps, shift)
    sigmas, timesteps = wan_schedule(num_steps, shift)
    np.testing.assert_array_equal(sched.timesteps, timesteps)
    np.testing.assert_array_equal(sched.sigmas, sigmas)
    assert sched.sigmas.shape == (num_steps + 1,) and sched.sigmas[-1] == 0
    assert sched.timesteps.dtype == np.int64 and sched.num_steps == num_steps


def test_default_schedule_ends_at_timestep_92_as_wan():
    # Wan's 50-step, shift-5 schedule; diffusers' UniPC (starting at sigma 1) ends at 96 instead.
    t = flow_schedule(50, 5.0).timesteps
    assert t[0] == 999 and t[-1] == 92 and t[-2] == 172


def test_unshifted_timesteps_truncate_not_round():
    # linspace(0.999..., 0, 11)[:-1] * 1000 = 999.00001, 899.1, ... -> 999, 899, ..., 99
    np.testing.assert_array_equal(
        flow_schedule(10, 1.0).timesteps, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    )


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_bad_num_steps_is_rejected(bad):
    with pytest.raises(ValueError, match="num_steps"):
        flow_schedule(bad, 5.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "5"])
def test_bad_shift_is_rejected(bad):
    with pytest.raises(ValueError, match="shift"):
        flow_schedule(10, bad)


def test_shift_too_large_for_float32_is_rejected():
    with pytest.raises(ValueError, match="strictly decreasing"):
        flow_schedule(200, 1e6)
