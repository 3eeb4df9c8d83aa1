"""Step schedules chosen by measurement: candidate operators, windows of a given density, and the
selection of phases and per-phase operators from per-step errors.

Pure host code over NumPy arrays; `fpsa_jax.training.calibration` measures the errors along a
model's dense sampling run and `python -m train.calibrate` is the app around both.

Errors. `StepErrors.sums` holds, per denoising step, layer and candidate, the sums behind the
relative L2 error of the self-attention output [B, L, N * D] against dense attention on the same
inputs (`metrics.error_sums`, pooled over heads, tokens, the CFG pair and every prompt and seed
measured). A candidate's error at a step is its worst layer's: `StepErrors.step_rel_l2`.

Selection (`select_schedule`). A schedule cuts the N steps into at most `max_phases` contiguous
phases and gives each phase one candidate (dense attention is always a candidate, error 0). A
phase's error for a candidate is its largest step error in the phase; the phase takes the
sparsest candidate whose phase error is within the error budget (ties: FP8 before bf16, then the
smaller error). Among all cuts, the one with the fewest computed tiles over all steps wins (ties:
fewer phases, then the earlier cut); it is found exactly by dynamic programming over cut points.
With a budget (`max_rel_l2`) that is the schedule. With a density target (`density`, the mean
over steps of the fraction of tiles computed) the budget is the smallest one whose sparsest
schedule meets the target, so the schedule minimises the worst phase error at that density.
Nothing forces the paper's shape (dense or less sparse middle steps, sparser early and late ones,
coarse groups early): where it appears, the measurements put it there. A looser budget never
gives a denser schedule (the feasible set only grows).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np

from fpsa_jax.attention.config import FPSAConfig, Int3, validate_grid
from fpsa_jax.attention.metrics import errors_from_sums
from fpsa_jax.attention.schedule import Phase, StepSchedule
from fpsa_jax.attention.tiling import window_for_density


def candidate_configs(
    tile: Int3,
    grid: Sequence[int],
    densities: Sequence[float],
    groups: Sequence[Int3],
    quants: Sequence[str],
    smooth_k: Sequence[bool] = (False,),
) -> tuple[FPSAConfig | None, ...]:
    """Dense (None) and every (window of each density, quantization) pair, without repeats.

    A window per density (`window_for_density`; equal windows counted once); for quant "fp8"
    one candidate per q_group = k_group in `groups` and per `smooth_k` value (mean-centred keys
    matter only under FP8), for "none" one (neither applies). The full window without FP8 is
    dense attention itself, which comes first.
    """
    windows = list(dict.fromkeys(window_for_density(tile, grid, d) for d in densities))
    out: list[FPSAConfig | None] = [None]
    for window, quant in itertools.product(windows, quants):
        fp8 = quant == "fp8"
        for g, smooth in itertools.product(
            groups if fp8 else [(1, 1, 1)], smooth_k if fp8 else [False]
        ):
            cfg = FPSAConfig(
                tile=tile, window=window, quant=quant, q_group=g, k_group=g, smooth_k=smooth
            )
            if (window is not None or quant != "none") and cfg not in out:
                out.append(cfg)
    return tuple(out)


def candidate_label(config: FPSAConfig | None, grid: Sequence[int]) -> str:
    """A short name: 'dense', or e.g. 'fp8 window (2, 1, 2) groups (1, 2, 2) 33%'."""
    if config is None:
        return "dense"
    window = "full window" if config.window is None else f"window {config.window}"
    groups = f" groups {config.q_group}" if config.quant == "fp8" else ""
    smooth = " smooth_k" if config.smooth_k else ""
    quant = "fp8" if config.quant == "fp8" else "bf16"
    return f"{quant} {window}{groups}{smooth} {config.density(grid):.0%}"


@dataclasses.dataclass(frozen=True)
class StepErrors:
    """Measured errors of candidate operators along a dense sampling run.

    Attributes:
      candidates: the C operators measured (None = dense).
      grid: the token grid (T, H, W) they were measured on.
      sums: float64 [num_steps, num_layers, C, 4, N]: `metrics.error_sums` of each candidate's
        self-attention output against dense attention, summed over the samples measured.
      num_samples: how many (prompt, seed) samples the sums pool.
    """

    candidates: tuple[FPSAConfig | None, ...]
    grid: Int3
    sums: np.ndarray
    num_samples: int = 1

    def __post_init__(self):
        sums = np.asarray(self.sums, np.float64)
        if sums.ndim != 5 or sums.shape[2] != len(self.candidates) or sums.shape[3] != 4:
            raise ValueError(
                f"StepErrors.sums must be [num_steps, num_layers, {len(self.candidates)}, 4, N], "
                f"got shape {sums.shape}"
            )
        object.__setattr__(self, "sums", sums)
        object.__setattr__(self, "grid", validate_grid(self.grid))

    @property
    def num_steps(self) -> int:
        return self.sums.shape[0]

    @property
    def rel_l2(self) -> np.ndarray:
        """float64 [num_steps, num_layers, C]: relative L2 error pooled over heads."""
        return errors_from_sums(np.moveaxis(self.sums.sum(axis=-1), -1, 0)).rel_l2

    @property
    def step_rel_l2(self) -> np.ndarray:
        """float64 [num_steps, C]: the worst layer's relative L2 error (NaN counts as inf)."""
        return np.nan_to_num(self.rel_l2, nan=np.inf).max(axis=1)

    @property
    def densities(self) -> np.ndarray:
        """float64 [C]: the fraction of tiles each candidate computes on `grid`."""
        return np.array([1.0 if c is None else c.density(self.grid) for c in self.candidates])


@dataclasses.dataclass(frozen=True)
class PhaseChoice:
    """Steps start <= i < stop use `config`: density on the grid, worst and mean step error."""

    start: int
    stop: int
    config: FPSAConfig | None
    density: float
    max_rel_l2: float
    mean_rel_l2: float


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A selected schedule with what was measured of it; `budget` is the error budget used (the
    given one, or the one a density target led to)."""

    schedule: StepSchedule
    phases: tuple[PhaseChoice, ...]
    budget: float

    @property
    def mean_density(self) -> float:
        """Mean over steps of the fraction of tiles computed."""
        steps = sum(p.stop - p.start for p in self.phases)
        return sum((p.stop - p.start) * p.density for p in self.phases) / steps

    @property
    def max_rel_l2(self) -> float:
        return max(p.max_rel_l2 for p in self.phases)


def select_schedule(
    errors: StepErrors,
    *,
    max_rel_l2: float | None = None,
    density: float | None = None,
    max_phases: int = 3,
) -> Calibration:
    """The schedule the module docstring's rule selects, under exactly one of an error budget
    `max_rel_l2` > 0 or a mean density target `density` in (0, 1].

    Raises ValueError for a bad budget or target, and for a target below every schedule's density.
    """
    if (max_rel_l2 is None) == (density is None):
        raise ValueError("give exactly one of max_rel_l2 (an error budget) and density (a target)")
    if isinstance(max_phases, bool) or not isinstance(max_phases, int) or max_phases < 1:
        raise ValueError(f"max_phases must be an int >= 1, got {max_phases!r}")
    table = _Table(errors)
    if max_rel_l2 is not None:
        if not (math.isfinite(max_rel_l2) and max_rel_l2 > 0):
            raise ValueError(f"max_rel_l2 must be a finite number > 0, got {max_rel_l2}")
        return table.calibration(max_rel_l2, max_phases)
    if not (math.isfinite(density) and 0 < density <= 1):
        raise ValueError(f"density must be in (0, 1], got {density}")
    # Every budget that changes the choice is some measured step error (0 is dense's).
    budgets = np.unique(table.step_err[np.isfinite(table.step_err)])
    if table.mean_density(table.cuts(budgets[-1], max_phases)) > density:
        sparsest = min(errors.densities)
        raise ValueError(
            f"no schedule reaches a mean density of {density:.1%}: the sparsest candidate "
            f"computes {sparsest:.1%} of the tiles"
        )
    lo, hi = 0, len(budgets) - 1  # the smallest budget index that meets the target, by bisection
    while lo < hi:
        mid = (lo + hi) // 2
        if table.mean_density(table.cuts(budgets[mid], max_phases)) <= density:
            hi = mid
        else:
            lo = mid + 1
    return table.calibration(float(budgets[lo]), max_phases)


class _Table:
    """Segment errors and costs for the dynamic programme over cut points."""

    # Densities in units of 2^-30, so that equal costs compare equal.
    _UNIT = 2**30

    def __init__(self, errors: StepErrors):
        self.errors = errors
        self.step_err = errors.step_rel_l2  # [S, C]
        # Dense against itself is exact, even where the reference is all zeros (0 / 0).
        self.step_err[:, [c is None for c in errors.candidates]] = 0.0
        self.num_steps = self.step_err.shape[0]
        self.cost = np.round(errors.densities * self._UNIT).astype(np.int64)
        fp8 = [c is not None and c.quant == "fp8" for c in errors.candidates]
        # Candidates in order of preference: sparsest, FP8 before bf16 (then by error).
        self.rank = [(int(self.cost[c]), not fp8[c]) for c in range(len(fp8))]
        # seg_err[a, b, c]: the worst step error of candidate c over steps a..b-1 (b > a).
        s = self.num_steps
        self.seg_err = np.full((s, s + 1, len(fp8)), np.inf)
        for a in range(s):
            self.seg_err[a, a + 1 :] = np.maximum.accumulate(self.step_err[a:], axis=0)

    def best(self, a: int, b: int, budget: float) -> int:
        """The preferred candidate within `budget` on steps a..b-1 (dense always qualifies)."""
        err = self.seg_err[a, b]
        ok = np.flatnonzero(err <= budget)
        if not len(ok):
            raise ValueError(
                f"no candidate is within the budget {budget} on steps {a}..{b - 1}, and dense "
                "attention (None) is not among the candidates"
            )
        return int(min(ok, key=lambda c: (*self.rank[c], err[c], c)))

    def cuts(self, budget: float, max_phases: int) -> list[tuple[int, int, int]]:
        """[(start, stop, candidate)] of the cheapest schedule within `budget`."""
        s, k_max = self.num_steps, min(max_phases, self.num_steps)
        seg = {(a, b): self.best(a, b, budget) for a in range(s) for b in range(a + 1, s + 1)}
        inf = np.iinfo(np.int64).max
        total = np.full((k_max + 1, s + 1), inf, np.int64)  # total[k, b]: steps 0..b-1, k phases
        back = np.zeros((k_max + 1, s + 1), np.int64)
        total[0, 0] = 0
        for k in range(1, k_max + 1):
            for b in range(k, s + 1):
                for a in range(k - 1, b):
                    if total[k - 1, a] == inf:
                        continue
                    t = total[k - 1, a] + self.cost[seg[a, b]] * (b - a)
                    if t < total[k, b]:  # strict: the earliest cut among equals
                        total[k, b], back[k, b] = t, a
        k = int(np.argmin(total[1:, s])) + 1  # the fewest phases among the cheapest
        out, b = [], s
        while k > 0:
            a = int(back[k, b])
            out.append((a, b, seg[a, b]))
            k, b = k - 1, a
        return _merge(out[::-1])

    def mean_density(self, cuts: list[tuple[int, int, int]]) -> float:
        dens = self.errors.densities
        return sum(float(dens[c]) * (b - a) for a, b, c in cuts) / self.num_steps

    def calibration(self, budget: float, max_phases: int) -> Calibration:
        cuts = self.cuts(budget, max_phases)
        s = self.num_steps
        cands, dens = self.errors.candidates, self.errors.densities
        phases = tuple(
            PhaseChoice(
                start=a,
                stop=b,
                config=cands[c],
                density=float(dens[c]),
                max_rel_l2=float(self.step_err[a:b, c].max()),
                mean_rel_l2=float(self.step_err[a:b, c].mean()),
            )
            for a, b, c in cuts
        )
        schedule = StepSchedule(
            tuple(Phase(1.0 if p.stop == s else p.stop / s, p.config) for p in phases)
        )
        return Calibration(schedule=schedule, phases=phases, budget=budget)


def _merge(cuts: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Adjacent segments of one candidate joined."""
    out: list[tuple[int, int, int]] = []
    for a, b, c in cuts:
        if out and out[-1][2] == c:
            out[-1] = (out[-1][0], b, c)
        else:
            out.append((a, b, c))
    return out
