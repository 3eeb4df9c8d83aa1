"""Schedule selection from per-step errors, windows of a given density and the candidate set,
against brute force on small hand-made error tables (no model: the measured side is in
tests/training/test_calibration.py)."""

import itertools
import math

import numpy as np
import pytest

from fpsa_jax.attention import FPSAConfig, StepSchedule
from fpsa_jax.attention.calibration import (
    StepErrors,
    candidate_configs,
    candidate_label,
    select_schedule,
)
from fpsa_jax.attention.tiling import window_for_density

GRID, TILE = (4, 4, 4), (1, 2, 2)  # tile grid (4, 2, 2): 16 tiles
WINDOWS = [(1, 1, 1), (2, 1, 1), (2, 2, 1), (4, 1, 2), (3, 2, 2)]  # 1, 2, 4, 8, 12 of 16
CANDIDATES = (None, *(FPSAConfig(TILE, w, "fp8") for w in WINDOWS))


def _errors(rel_l2: np.ndarray, candidates=CANDIDATES) -> StepErrors:
    """StepErrors whose rel. L2 is `rel_l2` [steps, layers, C] (one head, ||ref|| = 1)."""
    rel = np.asarray(rel_l2, np.float64)
    sums = np.stack([rel**2, np.ones_like(rel), np.ones_like(rel), np.ones_like(rel)], -1)
    return StepErrors(tuple(candidates), GRID, sums[..., None])


def _random_errors(seed: int, steps: int = 6, layers: int = 2) -> StepErrors:
    """Errors falling with density, different per step and layer; dense is exact."""
    rng = np.random.default_rng(seed)
    density = np.array([1.0] + [math.prod(w) / 16 for w in WINDOWS])
    rel = (1 - density) * rng.uniform(0.2, 1.0, size=(steps, layers, len(density)))
    return _errors(rel)


def _brute_force_cost(errors: StepErrors, budget: float, max_phases: int) -> float:
    """The fewest tiles over all steps of any schedule within `budget`, by enumeration."""
    step_err, dens, s = errors.step_rel_l2, errors.densities, errors.num_steps
    best = math.inf
    for k in range(max_phases):
        for cuts in itertools.combinations(range(1, s), k):
            bounds = (0, *cuts, s)
            cost = 0.0
            for a, b in itertools.pairwise(bounds):
                ok = [c for c in range(len(dens)) if step_err[a:b, c].max() <= budget]
                cost += (b - a) * min(dens[c] for c in ok)
            best = min(best, cost)
    return best


def test_window_for_density_is_the_nearest_window_and_dense_at_full():
    assert window_for_density(TILE, GRID, 1 / 16) == (1, 1, 1)
    # 8 of 16 tiles: (2, 2, 2), (4, 1, 2) and (4, 2, 1) are as even (max / min fraction 2): the
    # smallest tuple. 0.3: 4/16 is nearer than 6/16, and (1, 2, 2) less even than (2, 1, 2).
    assert window_for_density(TILE, GRID, 0.5) == (2, 2, 2)
    assert window_for_density(TILE, GRID, 0.3) == (2, 1, 2)
    assert window_for_density(TILE, GRID, 1.0) is None
    assert window_for_density(TILE, GRID, 0.97) is None
    for target in np.linspace(0.01, 1.0, 23):
        window = window_for_density(TILE, GRID, float(target))
        got = FPSAConfig(TILE, window).density(GRID)
        nearest = min(abs(v / 16 - target) for v in (1, 2, 3, 4, 6, 8, 12, 16))
        assert abs(got - target) == pytest.approx(nearest)
    for bad in (0.0, -0.1, 1.5, math.nan, "0.5"):
        with pytest.raises(ValueError, match="density must be"):
            window_for_density(TILE, GRID, bad)


def test_candidates_start_dense_have_no_repeats_and_groups_only_for_fp8():
    cands = candidate_configs(
        TILE, GRID, [0.06, 0.07, 0.5, 1.0], [(1, 1, 1), (2, 2, 2)], ["fp8", "none"]
    )
    assert cands[0] is None and len(set(cands)) == len(cands)
    assert {c.window for c in cands[1:]} == {(1, 1, 1), (2, 2, 2), None}
    assert all(c.q_group == (1, 1, 1) for c in cands[1:] if c.quant == "none")
    # full window: FP8 at both groups; without FP8 it is dense itself, already first
    assert sorted(c.q_group for c in cands[1:] if c.window is None) == [(1, 1, 1), (2, 2, 2)]
    assert len(cands) == 1 + 2 * 3 + 2
    assert candidate_label(None, GRID) == "dense"
    assert candidate_label(cands[1], GRID) == "fp8 window (1, 1, 1) groups (1, 1, 1) 6%"


def test_smooth_k_candidates_double_the_fp8_ones_only():
    args = (TILE, GRID, [0.5, 1.0], [(1, 1, 1)], ["fp8", "none"])
    plain, both = candidate_configs(*args), candidate_configs(*args, smooth_k=(False, True))
    fp8 = [c for c in plain[1:] if c.quant == "fp8"]
    assert len(both) == len(plain) + len(fp8)
    assert {c for c in both[1:] if c.smooth_k} == {
        FPSAConfig(c.tile, c.window, "fp8", smooth_k=True) for c in fp8
    }
    assert not any(c.smooth_k for c in both[1:] if c.quant == "none")
    smooth = next(c for c in both[1:] if c.smooth_k)
    assert "smooth_k" in candidate_label(smooth, GRID)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_phases", [1, 2, 3])
def test_budget_schedule_is_the_sparsest_within_budget_and_looser_is_never_denser(seed, max_phases):
    errors = _random_errors(seed)
    previous = math.inf
    for budget in (0.05, 0.2, 0.4, 0.6, 0.9, 2.0):
        cal = select_schedule(errors, max_rel_l2=budget, max_phases=max_phases)
        assert len(cal.phases) <= max_phases and cal.max_rel_l2 <= budget
        for p in cal.phases:  # every step of a phase, every layer, within budget
            c = CANDIDATES.index(p.config)
            assert errors.rel_l2[p.start : p.stop, :, c].max() <= budget
        total = cal.mean_density * errors.num_steps
        assert total == pytest.approx(_brute_force_cost(errors, budget, max_phases))
        assert cal.mean_density <= previous + 1e-12
        previous = cal.mean_density


def test_schedule_cuts_steps_at_the_measured_change_and_loads_as_json(tmp_path):
    # Steps 0-2 tolerate the sparsest window, steps 3-5 need 12/16, step 6-7 take 4/16.
    rel = np.full((8, 1, len(CANDIDATES)), 0.9)
    rel[:, :, 0] = 0.0
    rel[:3, :, 1] = 0.1
    rel[3:6, :, 5] = 0.1
    rel[6:, :, 3] = 0.1
    cal = select_schedule(_errors(rel), max_rel_l2=0.2)
    assert [(p.start, p.stop, p.config) for p in cal.phases] == [
        (0, 3, CANDIDATES[1]),
        (3, 6, CANDIDATES[5]),
        (6, 8, CANDIDATES[3]),
    ]
    assert [p.end_fraction for p in cal.schedule.phases] == [3 / 8, 6 / 8, 1.0]
    assert [cal.schedule.config_for_step(i, 8) for i in range(8)] == [
        CANDIDATES[i] for i in (1, 1, 1, 5, 5, 5, 3, 3)
    ]
    assert cal.mean_density == pytest.approx((3 * 1 + 3 * 12 + 2 * 4) / 16 / 8)
    path = tmp_path / "s.json"
    path.write_text(cal.schedule.to_json())
    assert StepSchedule.load(str(path)) == cal.schedule
    # One phase only: the one operator good enough for every step (the 12/16 window fails
    # steps 0-2 and 6-7), which here is dense.
    assert select_schedule(_errors(rel), max_rel_l2=0.2, max_phases=1).schedule.configs == (None,)


def test_worst_layer_decides_and_fp8_wins_a_tie_with_bf16():
    rel = np.zeros((2, 2, 3))
    bf16 = FPSAConfig(TILE, (2, 1, 1), "none")
    fp8 = FPSAConfig(TILE, (2, 1, 1), "fp8", (2, 2, 2), (2, 2, 2))
    rel[:, 0, 1:] = 0.05
    rel[:, 1, 1] = 0.05
    rel[:, 1, 2] = 0.3  # FP8 fine in layer 0, over budget in layer 1
    errors = _errors(rel, (None, bf16, fp8))
    assert select_schedule(errors, max_rel_l2=0.1).schedule.configs == (bf16,)
    assert select_schedule(errors, max_rel_l2=0.5).schedule.configs == (fp8,)


@pytest.mark.parametrize("seed", range(3))
def test_density_target_is_met_with_the_smallest_worst_error(seed):
    errors = _random_errors(seed)
    for target in (0.1, 0.3, 0.5, 0.8):
        cal = select_schedule(errors, density=target)
        assert cal.mean_density <= target + 1e-12
        # No smaller budget reaches the target: the one just below gives a denser schedule.
        below = np.unique(errors.step_rel_l2)
        below = below[below < cal.budget]
        if below.size and below[-1] > 0:
            assert select_schedule(errors, max_rel_l2=below[-1]).mean_density > target
        assert cal.max_rel_l2 <= cal.budget


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one of max_rel_l2"),
        ({"max_rel_l2": 0.1, "density": 0.5}, "exactly one of max_rel_l2"),
        ({"max_rel_l2": 0.0}, "max_rel_l2 must be a finite number > 0"),
        ({"max_rel_l2": -1.0}, "max_rel_l2 must be a finite number > 0"),
        ({"max_rel_l2": math.nan}, "max_rel_l2 must be a finite number > 0"),
        ({"density": 0.0}, r"density must be in \(0, 1\]"),
        ({"density": math.nan}, r"density must be in \(0, 1\]"),
        ({"density": 0.01}, "no schedule reaches a mean density of 1.0%"),
        ({"max_rel_l2": 0.1, "max_phases": 0}, "max_phases must be an int >= 1"),
    ],
)
def test_bad_budgets_and_targets_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_schedule(_random_errors(0), **kwargs)


def test_without_dense_among_candidates_an_impossible_budget_says_so():
    errors = _errors(np.full((2, 1, 2), 0.5), CANDIDATES[1:3])
    with pytest.raises(ValueError, match="no candidate is within the budget 0.1"):
        select_schedule(errors, max_rel_l2=0.1)
    with pytest.raises(ValueError, match=r"sums must be \[num_steps, num_layers, 2, 4, N\]"):
        StepErrors(CANDIDATES[1:3], GRID, np.zeros((2, 1, 3, 4, 1)))
