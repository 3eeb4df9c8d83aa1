"""Phase-grouped sigma sampling: every sample of a batch shares one FPSA schedule phase.

A training sample at noise level sigma uses `StepSchedule.config_for_sigma(sigma, N, shift)` (the
phase of the inference step whose sigma is nearest), so training sees inference's operator. The
phase is a static choice (one compiled train step per phase), hence one phase per batch:

  1. draw u0 ~ U(0, 1) and take the phase of sigma = F^-1(u0): phase p has probability
     P(p) = F(c_p) - F(c_{p+1}), the mass the sigma distribution puts on its sigma interval;
  2. draw the batch's sigmas from the distribution conditioned on that interval: u ~ U(F(c_{p+1}),
     F(c_p)), sigma = F^-1(u) (inverse CDF restricted to the phase's u-range).

Each sample's marginal is sum_p P(p) F(. | p) = F, the unconditioned distribution: phase grouping
changes which sigmas share a batch, not how often each sigma is trained. Samples of one batch are
not independent (they share the phase); across batches they are.

Phase cells are computed on the host against the float32 sigmas the app will look up: `lo`/`hi`
are the smallest / largest float32 values whose host lookup `phase_index_for_sigma(float(x))`
gives the phase, so after the final clip every drawn sigma maps to its phase exactly.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax.attention.config import FPSAConfig
from fpsa_jax.attention.schedule import StepSchedule
from fpsa_jax.flow_schedule import flow_schedule
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
    n, shift = config.num_inference_steps, config.inference_shift
    sig = flow_schedule(n, shift).sigmas[:-1]
    step_phase = np.array([schedule.phase_index(i, n) for i in range(n)])
    lookup = lambda x: schedule.phase_index_for_sigma(float(x), n, shift)  # noqa: E731
    num = len(schedule.phases)
    lo, hi = np.full(num, np.nan), np.full(num, np.nan)
    for p in range(num):
        steps = np.flatnonzero(step_phase == p)
        if steps.size == 0:
            continue
        a, b = steps[0], steps[-1]
        hi[p] = 1.0 if a == 0 else _edge(lookup, p, (sig[a - 1] + sig[a]) / 2, np.inf)
        lo[p] = 0.0 if b == n - 1 else _edge(lookup, p, (sig[b] + sig[b + 1]) / 2, -np.inf)
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


def _edge(lookup, phase: int, boundary: float, direction: float) -> float:
    """The float32 nearest `boundary` on the side of `phase`: the last x (moving toward
    `direction`) whose host lookup still gives `phase`."""
    x = np.float32(boundary)
    toward_phase = np.float32(-direction)
    while lookup(x) != phase:
        x = np.nextafter(x, toward_phase)
    while lookup(np.nextafter(x, np.float32(direction))) == phase:
        x = np.nextafter(x, np.float32(direction))
    return float(x)


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


def sample_phase_and_sigmas(
    key: Array, batch: int, config: TrainConfig, schedule: StepSchedule | None = None
) -> tuple[int, Array]:
    """A batch's phase (host int) and its sigmas [B] float32, every sigma in that phase.

    Host-side (the phase is returned as a Python int to pick the static FPSAConfig: see
    `phase_attention`); the sigmas' marginal is config's sigma distribution (module docstring).
    """
    table = phase_table(config, schedule)
    k_phase, k_sigma = jax.random.split(key)
    u0 = float(_uniform(k_phase))
    # u0 in [0, 1) lies in exactly one non-empty cell [u_lo, u_hi).
    phase = int(np.flatnonzero((table.u_lo <= u0) & (u0 < table.u_hi))[0])
    return phase, sample_sigmas_in_phase(k_sigma, batch, config, phase, schedule)
