"""Phase-grouped sigma sampling: every sample of a batch shares one FPSA schedule phase.

A training sample at noise level sigma uses the phase of the inference step whose sigma is nearest
(`fpsa_jax.sampling.FlowSchedule.nearest_step` for config.num_inference_steps and inference_shift),
so training sees inference's operator. The phase is a static choice (one compiled train step per
phase), hence one phase per batch:

  1. draw u0 ~ U(0, 1) and take the phase of sigma = F^-1(u0): phase p has probability
     P(p) = F(c_p) - F(c_{p+1}), the mass the sigma distribution puts on its sigma interval;
  2. draw the batch's sigmas from the distribution conditioned on that interval: u ~ U(F(c_{p+1}),
     F(c_p)), sigma = F^-1(u) (inverse CDF restricted to the phase's u-range).

Each sample's marginal is sum_p P(p) F(. | p) = F, the unconditioned distribution: phase grouping
changes which sigmas share a batch, not how often each sigma is trained. Samples of one batch are
not independent (they share the phase); across batches they are.

A phase's cell is the union of its steps' cells (`FlowSchedule.step_cells`: the float32 sigmas
whose host lookup gives the step), so `lo`/`hi` are the smallest / largest float32 values of the
phase and, after the final clip, every drawn sigma maps to its phase exactly.

`sample_phase` is the one call a training step makes: (phase, sigmas, operator).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax.attention.config import FPSAConfig
from fpsa_jax.attention.schedule import StepSchedule
from fpsa_jax.sampling.schedule import flow_schedule
from fpsa_jax.training.config import TrainConfig
from fpsa_jax.training.flow import sigma_cdf, sigma_from_u

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PhaseTable:
    """Host tables of the phase cells (P phases; index 0 = noisiest, highest sigmas).

    Attributes:
      sigma_lo, sigma_hi: float64 [P]: each phase's sigmas lie in [sigma_lo, sigma_hi] (float32
        values; both NaN for a phase that holds no inference step).
      u_lo, u_hi: float64 [P]: the phase's range of u = F(sigma); the ranges tile [0, 1].
      probs: float64 [P]: u_hi - u_lo, the probability of the phase.
    """

    sigma_lo: np.ndarray
    sigma_hi: np.ndarray
    u_lo: np.ndarray
    u_hi: np.ndarray

    @property
    def probs(self) -> np.ndarray:
        return self.u_hi - self.u_lo

    @property
    def num_phases(self) -> int:
        return int(self.u_lo.shape[0])


def _resolve(config: TrainConfig, schedule: StepSchedule | None) -> StepSchedule:
    schedule = config.schedule if schedule is None else schedule
    return StepSchedule.preset("dense") if schedule is None else schedule


def phase_attention(
    config: TrainConfig, phase: int, schedule: StepSchedule | None = None
) -> FPSAConfig | None:
    """The (static) FPSA operator of `phase` (None = dense); schedule defaults to config's."""
    phases = _resolve(config, schedule).phases
    if not 0 <= phase < len(phases):
        raise ValueError(f"phase must be in [0, {len(phases)}), got {phase}")
    return phases[phase].config


@functools.lru_cache(maxsize=64)
def _table(config: TrainConfig, schedule: StepSchedule) -> PhaseTable:
    n = config.num_inference_steps
    step_lo, step_hi = flow_schedule(n, config.inference_shift).step_cells()
    step_phase = np.array([schedule.phase_index(i, n) for i in range(n)])
    num = len(schedule.phases)
    lo, hi = np.full(num, np.nan), np.full(num, np.nan)
    for p in range(num):
        steps = np.flatnonzero(step_phase == p)
        if steps.size:  # phases are contiguous runs of steps, noisiest first
            hi[p], lo[p] = step_hi[steps[0]], step_lo[steps[-1]]
    # Cut halfway between the float32 edges of adjacent non-empty phases (an empty phase gets an
    # empty cell), so the u-ranges tile [0, 1]. cuts[p] is the upper sigma cut of phase p.
    cuts = np.zeros(num + 1)
    cuts[0] = 1.0
    for p in range(1, num):
        above = [q for q in range(p) if not np.isnan(lo[q])]
        below = [q for q in range(p, num) if not np.isnan(hi[q])]
        if not above or not below:  # only empty phases on one side
            cuts[p] = 1.0 if not above else 0.0
        else:
            cuts[p] = (lo[above[-1]] + hi[below[0]]) / 2
    u = np.asarray(sigma_cdf(cuts, config), np.float64)
    u[0], u[num] = 1.0, 0.0
    return PhaseTable(sigma_lo=lo, sigma_hi=hi, u_lo=u[1:], u_hi=u[:-1])


def phase_table(config: TrainConfig, schedule: StepSchedule | None = None) -> PhaseTable:
    """The phase cells of `schedule` (default config.schedule; None = one dense phase)."""
    return _table(config, _resolve(config, schedule))


def sample_sigmas_in_phase(
    key: Array, batch: int, config: TrainConfig, phase: int, schedule: StepSchedule | None = None
) -> Array:
    """`batch` i.i.d. sigmas [B] (float32) from config's distribution conditioned on `phase`."""
    table = phase_table(config, schedule)
    if not 0 <= phase < table.num_phases or table.probs[phase] <= 0:
        raise ValueError(
            f"phase must be a phase with probability > 0 among {table.num_phases}, got {phase} "
            f"(probabilities {np.round(table.probs, 6).tolist()})"
        )
    bounds = np.array(
        [table.u_lo[phase], table.u_hi[phase], table.sigma_lo[phase], table.sigma_hi[phase]],
        np.float32,
    )
    return _draw_in_cell(key, bounds, batch=batch, config=config)


@functools.partial(jax.jit, static_argnames=("batch", "config"))
def _draw_in_cell(key: Array, bounds: Array, *, batch: int, config: TrainConfig) -> Array:
    """bounds: float32 [4] = (u_lo, u_hi, sigma_lo, sigma_hi). Returns float32 [batch]."""
    u = jax.random.uniform(key, (batch,), jnp.float32, minval=bounds[0], maxval=bounds[1])
    return jnp.clip(sigma_from_u(u, config), bounds[2], bounds[3])


_uniform = jax.jit(lambda key: jax.random.uniform(key, (), jnp.float32))


class PhaseSample(NamedTuple):
    """What one train step takes from the schedule.

    Attributes:
      phase: the batch's phase (a host int; index 0 = noisiest).
      sigmas: float32 [B], every one in that phase's cell.
      attention: the phase's FPSA operator (None = dense), static for the compiled step.
    """

    phase: int
    sigmas: Array
    attention: FPSAConfig | None


def sample_phase(
    key: Array, batch: int, config: TrainConfig, schedule: StepSchedule | None = None
) -> PhaseSample:
    """A batch's phase, its sigmas [B] float32 (every sigma in that phase) and its operator.

    Host-side (the phase is a Python int and the operator a static FPSAConfig, so the caller
    picks the train step compiled for it); the sigmas' marginal is config's sigma distribution
    (module docstring). schedule defaults to config.schedule (None = one dense phase).
    """
    table = phase_table(config, schedule)
    k_phase, k_sigma = jax.random.split(key)
    u0 = float(_uniform(k_phase))
    # u0 in [0, 1) lies in exactly one non-empty cell [u_lo, u_hi).
    phase = int(np.flatnonzero((table.u_lo <= u0) & (u0 < table.u_hi))[0])
    sigmas = sample_sigmas_in_phase(k_sigma, batch, config, phase, schedule)
    return PhaseSample(phase, sigmas, phase_attention(config, phase, schedule))
