"""Wan2.1's flow-matching inference schedule: sigmas and integer timesteps for N steps.

Shared by the sampler (`fpsa_jax.sampling.sample`) and training, which maps a sampled noise level
to the step whose sigma is nearest (`FlowSchedule.nearest_step`, `FlowSchedule.step_cells`) and
uses that step's FPSA phase, so both see the same operator for the same noise level.

Flow convention: x_sigma = (1 - sigma) x0 + sigma eps, the model predicts v = eps - x0, and
sampling integrates dx/dsigma = v from sigma near 1 down to 0.

Wan (`FlowUniPCMultistepScheduler.set_timesteps`, used by `wan/text2video.py`) builds the schedule
on the host in float64 from a float32 training table:
  sigma_max = float32(1 - 1/1000) (the largest training sigma, stored as float32), sigma_min = 0;
  s_i = linspace(sigma_max, sigma_min, N + 1)[:-1]              (float64, i = 0 .. N-1)
  sigma_i = shift * s_i / (1 + (shift - 1) * s_i)              (float64)
  t_i = int64(sigma_i * 1000)                                  (truncation toward zero)
  solver sigmas = float32([sigma_0, ..., sigma_{N-1}, 0])      (the solver reads these)
The model sees the integer timesteps; the solver steps between the float32 sigmas.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000

# Wan's largest training sigma 1 - 1/1000 rounded to float32: set_timesteps starts from it.
WAN_SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
    """The host tables of one sampling run (N = num_steps).

    Attributes:
      sigmas: float64 [N + 1]: the solver's sigmas, rounded to float32 as Wan stores them,
        decreasing from just below 1; sigmas[N] = 0. Step i moves from sigmas[i] to sigmas[i + 1].
      timesteps: int64 [N]: the model's timestep input at step i, in Wan's 0..1000 scale.
      shift: the shift the sigmas were built with.
    """

    sigmas: np.ndarray
    timesteps: np.ndarray
    shift: float

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def nearest_step(self, sigma):
        """The step i whose sigmas[i] is nearest to `sigma` (float64 distance; a tie goes to the
        earlier, noisier step). A host number gives an int; an array gives an int array of its
        shape, computed with jnp (works under jit)."""
        sigmas = self.sigmas[:-1]
        if isinstance(sigma, numbers.Real):
            return int(np.argmin(np.abs(sigmas - float(sigma))))
        sigma = jnp.asarray(sigma)
        return jnp.argmin(jnp.abs(jnp.asarray(sigmas, sigma.dtype) - sigma[..., None]), axis=-1)

    def step_cells(self) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi): float64 [N] holding float32 values. The float32 sigmas in [0, 1] whose host
        `nearest_step` is i are exactly those in [lo[i], hi[i]]; hi[0] = 1 and lo[N - 1] = 0.

        Each inner edge is searched ulp by ulp from the midpoint of the two steps' sigmas, so
        the cells agree with the lookup bit for bit (the midpoint rounds either way in float32).
        """
        n = self.num_steps
        mid = (self.sigmas[:-2] + self.sigmas[1:-1]) / 2  # [N - 1], between steps i and i + 1
        lo = np.array([*(_edge(self, i, mid[i], -np.inf) for i in range(n - 1)), 0.0])
        hi = np.array([1.0, *(_edge(self, i + 1, mid[i], np.inf) for i in range(n - 1))])
        return lo, hi


def _edge(schedule: FlowSchedule, step: int, boundary: float, direction: float) -> float:
    """The float32 nearest `boundary` on the side of `step`: the last x (moving toward
    `direction`) whose host `nearest_step` is still `step`."""
    x = np.float32(boundary)
    toward_step = np.float32(-direction)
    while schedule.nearest_step(float(x)) != step:
        x = np.nextafter(x, toward_step)
    while schedule.nearest_step(float(np.nextafter(x, np.float32(direction)))) == step:
        x = np.nextafter(x, np.float32(direction))
    return float(x)


def _check_num_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps}")
    return int(num_steps)


def _check_shift(shift) -> float:
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    shift = float(shift)
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift}")
    return shift


def flow_schedule(num_steps: int, shift: float) -> FlowSchedule:
    """Wan2.1's sigmas and timesteps for `num_steps` steps and a time `shift` (Wan's default 5.0).

    Shift > 1 spends more steps at high noise: sigma -> shift * sigma / (1 + (shift - 1) sigma).
    """
    n = _check_num_steps(num_steps)
    shift = _check_shift(shift)
    s = np.linspace(WAN_SIGMA_MAX, 0.0, n + 1)[:-1]
    shifted = shift * s / (1.0 + (shift - 1.0) * s)
    timesteps = (shifted * NUM_TRAIN_TIMESTEPS).astype(np.int64)  # truncates, as torch's .to(int64)
    sigmas = np.concatenate([shifted, [0.0]]).astype(np.float32).astype(np.float64)
    if not (np.all(sigmas[:-1] > 0) and np.all(sigmas[:-1] < 1) and np.all(np.diff(sigmas) < 0)):
        raise ValueError(
            f"shift={shift} with num_steps={n} gives sigmas that are not strictly decreasing "
            f"inside (0, 1) in float32; use a smaller shift or fewer steps"
        )
    sigmas.setflags(write=False)
    timesteps.setflags(write=False)
    return FlowSchedule(sigmas=sigmas, timesteps=timesteps, shift=shift)
