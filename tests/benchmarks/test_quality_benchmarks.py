"""benchmarks/quality.py and qat_sweep.py: labelled rows for several fine-tuned checkpoints, the
mean density they report, and bad input refused in one line before any sampling or training."""

import dataclasses
import importlib.util
import sys

import pytest

from fpsa_jax.attention import StepSchedule
from fpsa_jax.demo import DEFAULT_CHECKPOINT, DENSE_CHECKPOINT, load_demo
from tests.benchmarks.bench import ROOT, run_benchmark

CALIBRATED = ROOT / "train" / "configs" / "demo-schedule-35.json"


def _module(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their neighbours
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_further_checkpoint_adds_its_labelled_rows_and_a_new_schedule_its_baseline():
    quality = _module("quality")
    dense, qat = load_demo(DENSE_CHECKPOINT), load_demo(DEFAULT_CHECKPOINT)
    same = dataclasses.replace(qat, info={"run": "again", "step": 800})
    other = dataclasses.replace(
        qat, schedule=StepSchedule.load(CALIBRATED), info={"run": "cal", "step": 1600}
    )
    names = [name for name, _, _ in quality.variants(dense, [qat, same, other])]
    base = [name for name, _, _ in quality.variants(dense, [qat])]
    assert names[: len(base)] == base
    assert names[len(base) :] == [
        "FPSA after QAT [again, step 800]",  # same schedule: no second training-free row
        "training-free FP8 + sparse [cal, step 1600]",
        "FPSA after QAT [cal, step 1600]",
    ]
    assert {quality.base_name(n) for n in names} == set(base)


def test_held_out_targets_pair_every_caption_with_the_given_seeds():
    quality = _module("quality")
    targets, seeds = quality.held_out_targets(3, 2000)
    assert len(targets) == len(seeds) == 3 * len({t.caption for t in targets})
    assert seeds[:6] == [2000, 2001, 2002, 2000, 2001, 2002]


def test_mean_density_averages_each_steps_window_over_the_sampling_steps():
    sweep = _module("qat_sweep")
    # demo: 5 / 10 / 5 of 20 steps at 2, 8 and 4 of the 12 tiles (tile grid (3, 2, 2)).
    assert sweep.mean_density(StepSchedule.preset("demo"), 20) == pytest.approx(110 / 240)
    # calibrated: steps 0-13 and 16-19 at 4 of 12 tiles, 14-15 at 6.
    assert sweep.mean_density(StepSchedule.load(CALIBRATED), 20) == pytest.approx(84 / 240)
    assert sweep.mean_density(StepSchedule.preset("dense"), 20) == 1.0


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("quality.py", ["--seeds", "0"], "--seeds must be >= 1, got 0"),
        ("quality.py", ["--noise_seed", "-1"], "--noise_seed must be in [0, 2^32 - --seeds]"),
        ("quality.py", ["--qat", "nosuch.safetensors"], "no checkpoint file nosuch.safetensors"),
        ("quality.py", ["--qat", str(DENSE_CHECKPOINT)], "was trained dense; it has no FPSA"),
        ("qat_sweep.py", ["--variant", "demo"], "--variant takes NAME=SCHEDULE[;KEY=VALUE...]"),
        ("qat_sweep.py", ["--variant", "a=demo;lr"], "--variant a: 'lr' is not KEY=VALUE"),
        ("qat_sweep.py", ["--variant", "a=demo", "--variant", "a=dense"], "names repeat"),
        (
            "qat_sweep.py",
            ["--variant", "a=demo", "--num_steps", "1000", "--eval_steps", "300"],
            "multiples of the smallest eval step",
        ),
        ("qat_sweep.py", ["--variant", "a=demo", "--eval_steps", "0"], "must lie in [1,"),
        ("qat_sweep.py", ["--variant", "a=nosuch"], "unknown StepSchedule preset 'nosuch'"),
        ("qat_sweep.py", ["--variant", "a=demo;sigma_shift=-1"], "--variant a: TrainConfig.sigma"),
        ("qat_sweep.py", ["--variant", "a=demo;speed=2"], "unknown TrainConfig fields ['speed']"),
        ("qat_sweep.py", ["--variant", "a=demo", "--dense", "no.safetensors"], "--dense: no ch"),
    ],
)
def test_bad_input_is_refused_in_one_line(script, args, message, tmp_path):
    result = run_benchmark(script, *args, "--json" if script == "quality.py" else "--runs_dir", str(
        tmp_path / ("q.json" if script == "quality.py" else "runs")
    ))  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "q.json").exists()
