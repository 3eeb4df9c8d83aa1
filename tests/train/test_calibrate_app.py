"""`python -m train.calibrate`: a measured schedule for the demo model that loads and honours its
budget, the Wan path on the tiny preset, windows from density targets without a model, bad flags
refused naming the flag before anything loads, and no file left behind by a failed run.

In-process (`parse_request` + `run`) except one CLI smoke test; few steps, one prompt and seed
and few candidates keep it cheap."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import app, flags

from fpsa_jax.attention import StepSchedule
from fpsa_jax.attention.calibration import StepErrors, select_schedule
from tests.conftest import subprocess_env
from train import calibrate, calibration, calibration_outputs

ROOT = Path(__file__).resolve().parents[2]
DEFAULTS = {name: flags.FLAGS[name].default for name in calibrate.FLAG_NAMES}
# Two steps of the embedded dense demo model; candidates dense and FP8 at a third of the tiles.
DEMO = dict(sample_steps=2, densities="0.33", groups="2x2x2", quant="fp8", attention_impl="xla")


def _request(tmp_path, **values):
    prompts = tmp_path / "prompts.txt"
    if not prompts.exists():
        prompts.write_text("a red square moves left quickly\n")
    values.setdefault("output", str(tmp_path / "out" / "schedule.json"))
    values.setdefault("prompts", str(prompts))
    return calibration.parse_request({**DEFAULTS, **values})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    return tmp, calibration.run(_request(tmp, max_rel_l2=0.3, **DEMO), progress_bar=True)


def test_demo_schedule_loads_honours_the_budget_and_looser_budgets_are_sparser(demo_run):
    tmp, result = demo_run
    out = tmp / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "schedule.csv",
        "schedule.json",
        "schedule.png",
    ]
    assert StepSchedule.load(str(out / "schedule.json")) == result.schedule
    assert (out / "schedule.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    errors = result.errors
    assert errors.num_steps == 2 and errors.num_samples == 1 and len(errors.candidates) == 2
    assert errors.grid == (9, 8, 8)
    rows = (out / "schedule.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 and rows[0].startswith("step,candidate,quant")
    assert sum(int(r.rsplit(",", 1)[1]) for r in rows[1:]) == 2  # one chosen operator per step
    for p in result.calibration.phases:  # the table's errors of the chosen operator, every layer
        c = errors.candidates.index(p.config)
        assert errors.rel_l2[p.start : p.stop, :, c].max() <= 0.3
    assert 0 < errors.step_rel_l2[:, 1:].min()  # FP8 and the window really are measured
    densities = [
        select_schedule(errors, max_rel_l2=b).mean_density for b in (0.01, 0.1, 0.3, 1.0, 3.0)
    ]
    assert densities == sorted(densities, reverse=True) and densities[-1] < 1.0
    assert "mean density over steps" in result.summary


def test_a_failure_after_measuring_leaves_no_file_behind(demo_run, tmp_path, monkeypatch):
    _, done = demo_run
    monkeypatch.setattr(calibration, "_measure", lambda request, bar: (done.errors, "demo"))

    def broken_png(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(calibration_outputs, "errors_png", broken_png)
    request = _request(tmp_path, max_rel_l2=0.3, **DEMO)
    with pytest.raises(RuntimeError, match="disk full"):
        calibration.run(request)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_files_are_written_all_or_none(tmp_path):
    good, bad = tmp_path / "a" / "s.json", tmp_path / "a" / "s.png"
    with pytest.raises(TypeError):
        calibration_outputs.write_all({good: "{}", bad: object()})
    assert list((tmp_path / "a").iterdir()) == []
    assert calibration_outputs.write_all({good: "{}", bad: b"png"}) == (good, bad)
    assert good.read_text() == "{}" and bad.read_bytes() == b"png"
    assert good.stat().st_mode & 0o777 != 0o600  # not a temp file's private mode


def test_without_matplotlib_the_png_is_skipped_with_a_note(demo_run, tmp_path, monkeypatch):
    import importlib.util

    _, done = demo_run
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name)
    )
    monkeypatch.setattr(calibration, "_measure", lambda request, bar: (done.errors, "demo"))
    request = _request(tmp_path, density=0.9, **DEMO)
    assert request.plot is None and "matplotlib is not installed" in request.notes[0]
    result = calibration.run(request)
    assert sorted(p.name for p in result.written) == ["schedule.csv", "schedule.json"]
    assert result.calibration.mean_density <= 0.9


def test_wan_weights_path_builds_the_runs_from_prompts_seeds_and_size(tmp_path, monkeypatch):
    """The --ckpt_dir path on the tiny preset, weights and UMT5 replaced by stand-ins and the
    measurement by a recorder (the measurement itself: tests/training/test_calibration.py)."""
    import fpsa_jax.convert
    import fpsa_jax.pipeline
    import fpsa_jax.training.calibration
    from fpsa_jax.config import WanConfig
    from fpsa_jax.convert import T2VWeights

    cfg = WanConfig.preset("tiny")
    encoded, measured = [], {}

    def encode_prompts(weights, prompts):
        encoded.append(list(prompts))
        return np.full((len(prompts), 7, cfg.text_dim), len(encoded), np.float32)

    def measure(config, params, samples, candidates, **kw):
        measured.update(config=config, samples=samples, candidates=candidates, **kw)
        sums = np.zeros((kw["num_steps"], cfg.num_layers, len(candidates), 4, cfg.num_heads))
        sums[..., 1:, :] = 1.0  # ||ref|| = ||o|| = <o, ref> = 1, no error: anything goes
        return StepErrors(candidates, (2, 2, 2), sums, len(samples))

    weights = T2VWeights(cfg, "params", None, None)
    monkeypatch.setattr(fpsa_jax.convert, "load_t2v_weights", lambda path: weights)
    monkeypatch.setattr(fpsa_jax.pipeline, "encode_prompts", encode_prompts)
    monkeypatch.setattr(fpsa_jax.training.calibration, "measure_step_errors", measure)
    (tmp_path / "prompts.txt").write_text("a cat\n\nthe sea at night\n")
    request = _request(
        tmp_path,
        ckpt_dir=_wan_dir(tmp_path),
        size="32*32",
        frame_num=5,
        seeds="3,4",
        tile="1x1x1",
        densities="0.25,1",
        quant="none",
        max_rel_l2=0.1,
        plot="",
    )
    assert request.grid == (2, 2, 2) and request.prompts == ("a cat", "the sea at night")
    result = calibration.run(request)
    assert encoded == [["a cat", "the sea at night"], [fpsa_jax.pipeline.WAN_NEGATIVE_PROMPT]]
    samples = measured["samples"]
    assert len(samples) == 4 and all(s.noise.shape == (1, 2, 4, 4, 16) for s in samples)
    assert [float(s.context[0, 0, 0]) for s in samples] == [1.0, 1.0, 1.0, 1.0]
    np.testing.assert_array_equal(samples[0].context, np.asarray(samples[1].context))
    assert not np.array_equal(samples[0].noise, samples[1].noise)  # seeds 3 and 4
    np.testing.assert_array_equal(samples[0].noise, samples[2].noise)  # seed 3, both prompts
    assert (measured["num_steps"], measured["shift"], measured["guide_scale"]) == (50, 5.0, 5.0)
    assert measured["condition"] is None and measured["config"] is cfg
    assert [c.window for c in measured["candidates"][1:]] == [(1, 1, 2)]
    assert result.schedule.configs == (measured["candidates"][1],)  # error-free: the sparsest
    assert StepSchedule.load(str(tmp_path / "out" / "schedule.json")) == result.schedule


@pytest.mark.parametrize(
    "values, preset",
    [
        (dict(phase_densities="0.23,0.51,0.31", size="832*480"), "wan-480p"),
        (dict(phase_densities="0.11,0.33,0.14", size="1280*720"), "wan-720p"),
    ],
)
def test_phase_densities_rebuild_the_wan_presets_without_a_model(tmp_path, values, preset):
    request = _request(tmp_path, **values)
    assert request.grid == {"wan-480p": (21, 30, 52), "wan-720p": (21, 45, 80)}[preset]
    result = calibration.run(request)
    assert result.written == (tmp_path / "out" / "schedule.json",)
    assert StepSchedule.load(str(result.written[0])) == StepSchedule.preset(preset)


def _wan_dir(tmp_path):
    model = tmp_path / "wan"
    for part in ("transformer", "vae", "text_encoder", "tokenizer"):
        (model / part).mkdir(parents=True, exist_ok=True)
    return str(model)


BAD = [
    ({}, "give exactly one of --max_rel_l2"),
    (dict(max_rel_l2=0.1, density=0.5), "give exactly one of --max_rel_l2"),
    (dict(max_rel_l2=0.1, phase_densities="0.5"), "give exactly one of --max_rel_l2"),
    (dict(max_rel_l2=0.0), "--max_rel_l2: must be a finite number > 0, got 0.0"),
    (dict(max_rel_l2=-1.0), "--max_rel_l2: must be a finite number > 0"),
    (dict(max_rel_l2=float("nan")), "--max_rel_l2: must be a finite number > 0, got nan"),
    (dict(max_rel_l2=float("inf")), "--max_rel_l2: must be a finite number > 0"),
    (dict(density=0.0), "--density: must be in (0, 1], got 0.0"),
    (dict(density=1.5), "--density: must be in (0, 1]"),
    (dict(density=float("nan")), "--density: must be in (0, 1], got nan"),
    (dict(density=0.05), "--density: 0.05 is below every candidate: the sparsest computes 8.3%"),
    (dict(max_rel_l2=0.1, sample_steps=0), "--sample_steps: must be >= 1, got 0"),
    (dict(max_rel_l2=0.1, max_phases=0), "--max_phases: must be >= 1, got 0"),
    (dict(max_rel_l2=0.1, sample_shift=0.0), "--sample_shift: must be a finite number > 0"),
    (dict(max_rel_l2=0.1, sample_guide_scale=-1.0), "--sample_guide_scale: must be a finite"),
    (dict(max_rel_l2=0.1, seeds="0,x"), "--seeds: expected comma-separated ints"),
    (dict(max_rel_l2=0.1, seeds=str(2**32)), "--seeds: seeds must be in [0, 2^32)"),
    (dict(max_rel_l2=0.1, size="832*480"), "--size: needs --ckpt_dir"),
    (dict(max_rel_l2=0.1, negative_prompt="blurry"), "--negative_prompt: needs --ckpt_dir"),
    (dict(max_rel_l2=0.1, ckpt_dir="/no/such/model"), "--ckpt_dir: model directory not found"),
    (dict(max_rel_l2=0.1, ckpt_dir="{tmp}"), "--ckpt_dir: {tmp} is not a complete Wan2.1"),
    (dict(max_rel_l2=0.1, ckpt_dir="WAN", prompts=None), "--prompts: required with --ckpt_dir"),
    (dict(max_rel_l2=0.1, ckpt_dir="WAN", size="83*48"), "--size/--frame_num: video size"),
    (dict(max_rel_l2=0.1, ckpt_dir="WAN", size="big"), "--size: must look like 832*480"),
    (dict(max_rel_l2=0.1, ckpt_dir="WAN", frame_num=4), "frame count must be 4k+1"),
    (dict(max_rel_l2=0.1, demo_checkpoint="/no/m.safetensors"), "--demo_checkpoint: file not"),
    (dict(max_rel_l2=0.1, prompts="/no/prompts.txt"), "--prompts: file not found"),
    (dict(max_rel_l2=0.1, prompts="{tmp}/empty.txt"), "--prompts: no prompts in"),
    (dict(max_rel_l2=0.1, tile="3x4"), "--tile: expected TxHxW of positive ints"),
    (dict(max_rel_l2=0.1, densities="0,0.5"), "--densities: every value must be in (0, 1]"),
    (dict(max_rel_l2=0.1, densities="half"), "--densities: expected comma-separated numbers"),
    (dict(max_rel_l2=0.1, groups="2x2"), "--groups: expected TxHxW"),
    (dict(max_rel_l2=0.1, quant="int8"), "--quant: values must be fp8 or none"),
    (dict(max_rel_l2=0.1, output=None), "--output: required"),
    (dict(max_rel_l2=0.1, output="{tmp}/s.txt"), "--output: must end in .json"),
    (dict(max_rel_l2=0.1, output="{tmp}/taken.json"), "taken.json exists; pass --overwrite"),
    (dict(max_rel_l2=0.1, output="{tmp}/dir.json"), "dir.json is a directory"),
    (dict(max_rel_l2=0.1, output="{tmp}/taken.json/s.json"), "taken.json is not a directory"),
    (dict(max_rel_l2=0.1, plot="{tmp}/p.jpg"), "--plot: must end in .png"),
    (dict(max_rel_l2=0.1, csv="{tmp}/taken.csv"), "--csv: {tmp}/taken.csv exists"),
    (dict(phase_densities="0.2,0.5"), "--phase_densities: needs one --phase_ends"),
    (dict(phase_densities="0.2,0.5,0.3", phase_ends="0.5,0.4,1"), "--phase_ends: StepSchedule"),
]


def _fill(value, tmp_path):
    """Placeholders of BAD: WAN = an (empty) diffusers-layout model folder, {tmp} = tmp_path."""
    if value == "WAN":
        return _wan_dir(tmp_path)
    return value.replace("{tmp}", str(tmp_path)) if isinstance(value, str) else value


@pytest.mark.parametrize("values, message", BAD)
def test_bad_flags_are_refused_naming_the_flag_before_anything_loads(tmp_path, values, message):
    (tmp_path / "taken.json").write_text("{}")
    (tmp_path / "taken.csv").write_text("")
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    given = {
        "output": str(tmp_path / "new" / "s.json"),
        "prompts": str(tmp_path / "prompts.txt"),
        **{k: _fill(v, tmp_path) for k, v in values.items()},
    }
    with pytest.raises(app.UsageError) as e:
        calibration.parse_request({**DEFAULTS, **given})
    assert message.replace("{tmp}", str(tmp_path)) in str(e.value)
    assert "\n" not in str(e.value)  # one line
    assert not (tmp_path / "new").exists()


def test_an_unwritable_output_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(calibration_outputs, "writable", lambda folder: False)
    with pytest.raises(app.UsageError, match="--output: cannot write to"):
        _request(tmp_path, max_rel_l2=0.1)


def test_help_explains_every_flag():
    for name in calibrate.FLAG_NAMES:
        assert len(flags.FLAGS[name].help) > 20, name


def test_cli_writes_a_schedule_that_loads(tmp_path):
    """The app end to end in its model-free mode (the measuring modes run in-process above)."""
    out = tmp_path / "s.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.calibrate",
            "--phase_densities=0.25,0.5",
            "--phase_ends=0.5,1",
            "--phase_groups=2x2x2,1x1x1",
            f"--output={out}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote {out}" in proc.stdout
    assert "schedule for the token grid (9, 8, 8):" in proc.stdout
    schedule = StepSchedule.load(str(out))
    assert [p.config.window for p in schedule.phases] == [(3, 1, 1), (3, 1, 2)]
    assert [p.config.density((9, 8, 8)) for p in schedule.phases] == [0.25, 0.5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]
