"""Phase-grouped sigma sampling: phases have the sigma distribution's mass, each phase's sigmas map
to it under StepSchedule's lookup, and the marginal sigma distribution is unchanged."""

import math

import jax
import numpy as np
import pytest

from fpsa_jax.attention import FPSAConfig, StepSchedule
from fpsa_jax.sampling import flow_schedule
from fpsa_jax.training import (
    TrainConfig,
    phase_attention,
    phase_table,
    sample_phase,
    sample_sigmas_in_phase,
)
from tests.training.test_flow import KS_C, analytic_cdf, ks_statistic

SCHEDULE = StepSchedule.preset("wan-480p")
SHIFTED = TrainConfig(schedule=SCHEDULE)
# Training and inference distributions that differ: phase masses are no longer the step fractions.
LOGIT_NORMAL = TrainConfig(
    schedule=SCHEDULE, sigma_sampling="logit_normal", num_inference_steps=30, inference_shift=3.0
)
CONFIGS = pytest.mark.parametrize("config", [SHIFTED, LOGIT_NORMAL], ids=["shifted", "logit"])


def host_phases(sigmas, config):
    """The host lookup (nearest step by float64 distance, first on ties), vectorised."""
    n, shift = config.num_inference_steps, config.inference_shift
    grid = flow_schedule(n, shift).sigmas[:-1]
    steps = np.argmin(np.abs(grid[None, :] - np.asarray(sigmas, np.float64)[:, None]), axis=1)
    return np.array([config.schedule.phase_index(int(i), n) for i in steps])


@CONFIGS
def test_phase_masses_are_the_cdf_differences_at_the_phase_edges(config):
    table = phase_table(config)
    assert table.num_phases == 3
    np.testing.assert_allclose(table.probs.sum(), 1.0, atol=1e-12)
    # Phase 0 is the noisiest: u-ranges are ordered downwards and tile [0, 1].
    np.testing.assert_array_equal(table.u_hi[1:], table.u_lo[:-1])
    assert table.u_hi[0] == 1.0 and table.u_lo[-1] == 0.0
    for p in range(3):
        lo, hi = table.sigma_lo[p], table.sigma_hi[p]
        mass = analytic_cdf(hi, config) - analytic_cdf(lo, config)
        np.testing.assert_allclose(table.probs[p], mass, atol=1e-6)


def test_training_shift_equal_to_inference_shift_gives_the_step_fractions():
    """With u-uniform inference sigmas (shift 5 both sides) a phase's mass is its share of steps:
    13, 25 and 12 of 50 steps for the (0.25, 0.75, 1.0) split, up to half a step at the ends."""
    np.testing.assert_allclose(phase_table(SHIFTED).probs, [13 / 50, 25 / 50, 12 / 50], atol=0.011)


@CONFIGS
def test_each_phases_sigmas_map_to_that_phase(config):
    table = phase_table(config)
    for p in range(3):
        s = np.asarray(sample_sigmas_in_phase(jax.random.key(p), 20_000, config, p))
        assert s.dtype == np.float32
        np.testing.assert_array_equal(host_phases(s, config), p)
        # The edges are the extreme float32 values of the phase: one ulp further is another phase.
        lo, hi = np.float32(table.sigma_lo[p]), np.float32(table.sigma_hi[p])
        n, shift = config.num_inference_steps, config.inference_shift
        flow = flow_schedule(n, shift)
        for edge in (lo, hi):
            assert config.schedule.phase_index(flow.nearest_step(float(edge)), n) == p
        assert host_phases([lo, hi], config).tolist() == [p, p]
        if p > 0:
            assert host_phases([np.nextafter(hi, np.float32(2))], config)[0] == p - 1
        if p < 2:
            assert host_phases([np.nextafter(lo, np.float32(-1))], config)[0] == p + 1


@CONFIGS
def test_sigmas_within_a_phase_follow_the_conditioned_distribution(config):
    table = phase_table(config)
    n = 50_000
    for p in range(3):
        s = np.asarray(sample_sigmas_in_phase(jax.random.key(10 + p), n, config, p))
        lo, hi = table.sigma_lo[p], table.sigma_hi[p]
        f_lo, f_hi = analytic_cdf(lo, config), analytic_cdf(hi, config)
        cdf = lambda x: (analytic_cdf(x, config) - f_lo) / (f_hi - f_lo)  # noqa: B023
        assert ks_statistic(s, cdf) < KS_C / math.sqrt(n)


@CONFIGS
def test_phase_grouping_keeps_the_marginal_sigma_distribution(config):
    table = phase_table(config)
    calls, b = 4000, 4
    keys = jax.random.split(jax.random.key(7), calls)
    phases, sigmas, _ = zip(*(sample_phase(k, b, config) for k in keys), strict=True)
    phases, sigmas = np.array(phases), np.concatenate([np.asarray(s) for s in sigmas])
    for p in range(3):  # phase frequencies: binomial, 4 standard deviations
        freq = np.mean(phases == p)
        sd = math.sqrt(table.probs[p] * (1 - table.probs[p]) / calls)
        assert abs(freq - table.probs[p]) < 4 * sd
    np.testing.assert_array_equal(host_phases(sigmas, config), np.repeat(phases, b))
    # Samples of one batch share a phase, so they are not independent: bound the KS statistic
    # with the number of independent batches, not of samples (a conservative tolerance).
    assert ks_statistic(sigmas, lambda x: analytic_cdf(x, config)) < KS_C / math.sqrt(calls)


def test_dense_config_has_one_phase_holding_every_sigma():
    config = TrainConfig()
    table = phase_table(config)
    assert table.num_phases == 1 and table.probs.tolist() == [1.0]
    phase, sigmas, attention = sample_phase(jax.random.key(0), 50_000, config)
    assert phase == 0 and attention is None and phase_attention(config, 0) is None
    assert ks_statistic(np.asarray(sigmas), lambda x: analytic_cdf(x, config)) < KS_C / math.sqrt(
        50_000
    )


def test_phase_attention_returns_the_phase_operator_and_rejects_bad_indices():
    assert phase_attention(SHIFTED, 1) == SCHEDULE.phases[1].config
    assert isinstance(phase_attention(SHIFTED, 2), FPSAConfig)
    with pytest.raises(ValueError, match="phase must be in \\[0, 3\\)"):
        phase_attention(SHIFTED, 3)


def test_sample_phase_returns_the_operator_of_the_phase_it_drew():
    draws = [sample_phase(k, 2, SHIFTED) for k in jax.random.split(jax.random.key(3), 20)]
    assert {d.phase for d in draws} == {0, 1, 2}
    for d in draws:
        assert d.attention == SCHEDULE.phases[d.phase].config and d.sigmas.shape == (2,)


def test_a_phase_without_steps_has_no_mass_and_cannot_be_sampled():
    """ends (0.01, 0.015, 1.0) of 50 steps: step 0 is phase 0, phase 1 gets no step."""
    cfg = FPSAConfig(tile=(1, 2, 2))
    schedule = StepSchedule(((0.01, cfg), (0.015, None), (1.0, cfg)))
    config = TrainConfig(schedule=schedule)
    table = phase_table(config)
    assert table.probs[1] == 0.0 and table.probs[0] > 0 and table.probs[2] > 0
    with pytest.raises(ValueError, match="probability > 0"):
        sample_sigmas_in_phase(jax.random.key(0), 4, config, 1)
    phases = [sample_phase(k, 1, config).phase for k in jax.random.split(jax.random.key(1), 200)]
    assert 1 not in phases
