"""Wan's sigmas and timesteps against an independent re-derivation of set_timesteps; the
nearest-step lookup of a noise level and the float32 cells it partitions [0, 1] into."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpsa_jax.attention import FPSAConfig, Phase, StepSchedule
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


def test_sigma_maps_to_nearest_shifted_inference_sigma():
    flow = flow_schedule(50, 5.0)
    sig = flow.sigmas[:-1]
    np.testing.assert_allclose(sig[0], 5 * 0.999 / (1 + 4 * 0.999), rtol=1e-6)
    assert np.all(np.diff(sig) < 0) and sig[-1] > 0
    for i in (0, 7, 31, 49):
        assert flow.nearest_step(float(sig[i])) == i
    assert flow.nearest_step(1.0) == 0 and flow.nearest_step(0.0) == 49
    # Under jit, composed with a StepSchedule's phase lookup (as a lax.switch index would be).
    a = FPSAConfig(tile=(1, 2, 2), window=(1, 1, 1), quant="fp8", q_group=(2, 2, 2))
    b = FPSAConfig(tile=(1, 2, 2), window=(3, 3, 3), quant="fp8")
    sched = StepSchedule((Phase(0.2, a), Phase(0.7, b), Phase(1.0, None)))
    traced = jax.jit(lambda s: sched.phase_index(flow.nearest_step(s), 50))(
        jnp.asarray(sig[[0, 20, 45]])
    )
    np.testing.assert_array_equal(traced, [sched.phase_index(i, 50) for i in (0, 20, 45)])


@pytest.mark.parametrize("num_steps,shift", [(50, 5.0), (30, 3.0), (7, 1.0), (1, 5.0)])
def test_step_cells_are_the_float32_sigmas_each_step_is_nearest_to(num_steps, shift):
    flow = flow_schedule(num_steps, shift)
    lo, hi = flow.step_cells()
    assert hi[0] == 1.0 and lo[-1] == 0.0
    lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
    np.testing.assert_array_equal(lo32, lo)  # float32 values
    np.testing.assert_array_equal(hi32, hi)
    for i in range(num_steps):
        assert flow.nearest_step(float(lo32[i])) == i and flow.nearest_step(float(hi32[i])) == i
        assert lo32[i] <= flow.sigmas[i] <= hi32[i]
        if i > 0:  # one ulp up is the previous (noisier) step: the cells tile [0, 1]
            assert np.nextafter(hi32[i], np.float32(2)) == lo32[i - 1]
            assert flow.nearest_step(float(np.nextafter(hi32[i], np.float32(2)))) == i - 1
