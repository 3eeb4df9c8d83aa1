"""StepSchedule: phase lookup by step, JSON round trip, presets."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fpsa_jax.attention import FPSAConfig, Phase, StepSchedule

A = FPSAConfig(tile=(1, 2, 2), window=(1, 1, 1), quant="fp8", q_group=(2, 2, 2))
B = FPSAConfig(tile=(1, 2, 2), window=(3, 3, 3), quant="fp8")
SCHED = StepSchedule((Phase(0.2, A), Phase(0.7, B), Phase(1.0, None)))


@pytest.mark.parametrize("name", ["wan-480p", "wan-720p", "dense"])
def test_json_round_trip(name):
    s = StepSchedule.preset(name)
    assert StepSchedule.from_json(s.to_json()) == s
    assert StepSchedule.from_json(SCHED.to_json()) == SCHED


def test_config_for_step_uses_first_phase_with_fraction_below_end():
    got = [SCHED.config_for_step(i, 10) for i in range(10)]
    assert got == [A, A, B, B, B, B, B, None, None, None]  # 2/10 is not < 0.2


@settings(max_examples=40)
@given(num_steps=st.integers(1, 80))
def test_phase_index_agrees_on_host_and_under_jit(num_steps):
    steps = np.arange(num_steps)
    host = [SCHED.phase_index(int(i), num_steps) for i in steps]
    want = [
        next(p for p, ph in enumerate(SCHED.phases) if i / num_steps < ph.end_fraction)
        for i in steps
    ]
    assert host == want
    np.testing.assert_array_equal(jax.jit(lambda s: SCHED.phase_index(s, num_steps))(steps), want)


def test_presets_follow_the_papers_shape():
    for name, grid in (("wan-480p", (21, 30, 52)), ("wan-720p", (21, 45, 80))):
        early, middle, late = StepSchedule.preset(name).configs
        assert all(c.tile_volume % 64 == 0 and c.quant == "fp8" for c in (early, middle, late))
        assert early.density(grid) < late.density(grid) < middle.density(grid)
        assert middle.q_group == (1, 1, 1)
        assert np.prod(early.q_group) > np.prod(late.q_group) > np.prod(middle.q_group)
    assert StepSchedule.preset("dense").configs == (None,)


def test_wan_preset_windows_are_the_nearest_to_their_stated_density_targets():
    from fpsa_jax.attention.tiling import window_for_density

    for name, grid, targets in (
        ("wan-480p", (21, 30, 52), (0.23, 0.51, 0.31)),
        ("wan-720p", (21, 45, 80), (0.11, 0.33, 0.14)),
    ):
        configs = StepSchedule.preset(name).configs
        assert [c.window for c in configs] == [
            window_for_density((3, 8, 8), grid, t) for t in targets
        ]
        for c, t in zip(configs, targets, strict=True):
            assert abs(c.density(grid) - t) < 0.01  # as stated in the preset's docstring
    # The demo model's shipped schedule is its own, not derived.
    assert [c.window for c in StepSchedule.preset("demo").configs] == [
        (2, 1, 1),
        (2, 2, 2),
        (2, 1, 2),
    ]


@pytest.mark.parametrize(
    "phases, field",
    [
        ((), "must not be empty"),
        ((Phase(0.5, A), Phase(0.5, B), Phase(1.0, None)), r"phases\[1\].end_fraction"),
        ((Phase(0.5, A), Phase(0.9, B)), r"phases\[-1\].end_fraction must be 1.0"),
        ((Phase(1.5, A),), r"phases\[0\].end_fraction"),
        ((Phase("x", A),), r"phases\[0\].end_fraction must be a number"),
        ((Phase(1.0, {"tile": (1, 1, 1)}),), r"phases\[0\].config"),
        (((0.5, A, 3),), "must be \\(end_fraction, config\\)"),
        ("abc", "must be a sequence"),
    ],
)
def test_invalid_schedules_name_the_field(phases, field):
    with pytest.raises(ValueError, match=field):
        StepSchedule(phases)


def test_invalid_lookups_raise():
    with pytest.raises(ValueError, match="step must be in"):
        SCHED.config_for_step(10, 10)
    with pytest.raises(ValueError, match="num_steps"):
        SCHED.config_for_step(0, 0)
    with pytest.raises(ValueError, match="unknown StepSchedule preset"):
        StepSchedule.preset("wan-1080p")
    with pytest.raises(ValueError, match="exactly the key 'phases'"):
        StepSchedule.from_dict({"phases": [], "extra": 1})


def test_load_reads_a_preset_name_or_a_json_file(tmp_path):
    assert StepSchedule.load("wan-720p") == StepSchedule.preset("wan-720p")
    path = tmp_path / "mine.json"
    path.write_text(SCHED.to_json())
    assert StepSchedule.load(str(path)) == SCHED


@pytest.mark.parametrize(
    "text, error, match",
    [
        (None, FileNotFoundError, "StepSchedule file not found"),
        # Before: KeyError('config') and "got [1, 2]" (a sorted list passed for its keys).
        (
            '{"phases": [{"end_fraction": 1.0}]}',
            ValueError,
            r"^StepSchedule phases\[0\] must be an object with exactly the keys end_fraction and "
            r"config \(null for dense\), got keys \['end_fraction'\]$",
        ),
        ("[1, 2]", ValueError, r'^a StepSchedule is \{"phases": \[.*\]\}, got a list$'),
        ('{"phases": {"a": 1}}', ValueError, "^StepSchedule 'phases' must be a list"),
        (
            '{"phases": [{"end_fraction": 1.0, "config": {"window": [1, 1, 1]}}]}',
            ValueError,
            r"^StepSchedule phases\[0\].config: FPSAConfig: missing fields \['tile'\]",
        ),
        (
            '{"phases": [{"end_fraction": 1.0, "config": 3}]}',
            ValueError,
            r"^StepSchedule phases\[0\].config must be an FPSAConfig object or null, got 3$",
        ),
        ("{not json", ValueError, "not a StepSchedule JSON file"),
        ('{"phases": [{"end_fraction": 2.0, "config": null}]}', ValueError, "end_fraction"),
    ],
)
def test_load_names_what_is_wrong_with_a_file(tmp_path, text, error, match):
    path = tmp_path / "s.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(error, match=match):
        StepSchedule.load(str(path))
