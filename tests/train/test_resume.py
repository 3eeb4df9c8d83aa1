"""Resuming a training run: a damaged latest checkpoint is skipped (said so, kept aside), none
restoring stops with one line, another model is refused before any restore, --remat is not
another model, a changed TrainConfig is a warning, metrics.csv never repeats a step, and the
workdir is checked before any weights load."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil

import pytest

from fpsa_jax.outputs import OutputError
from tests.train.test_train_app import _settings, _train_cli
from train.loop import run
from train.resume import ResumeError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir trained to step 4: checkpoints at 2 and 4, metrics of steps 1-4."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    run(_settings(workdir, 4))
    return workdir


@pytest.fixture()
def workdir(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _damage(workdir, step):
    """Zeroes every byte of the step's saved state (sizes kept): a bad disk or copy."""
    for path in (workdir / "checkpoints" / str(step) / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\0" * path.stat().st_size)


def _logged_steps(workdir) -> list[int]:
    with (workdir / "metrics.csv").open() as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def test_a_damaged_latest_checkpoint_is_skipped_and_the_run_resumes_before_it(workdir, capsys):
    """Before: a 30-150 line orbax/tensorstore traceback."""
    _damage(workdir, 4)
    run(_settings(workdir, 6))
    out, err = capsys.readouterr()
    assert "resuming from step 2 in" in out
    skipped = workdir / "skipped_checkpoints" / "4"
    assert "skipped checkpoint step 4 (" in err and f"moved it to {skipped}" in err
    assert (skipped / "state").is_dir()  # kept, not deleted
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        2,
        4,
        6,
    ]
    # Steps 3 and 4 were logged by the first run and again after resuming from 2: once each.
    assert _logged_steps(workdir) == [1, 2, 3, 4, 5, 6]


def test_when_no_checkpoint_restores_the_run_stops_naming_each_step(workdir):
    _damage(workdir, 4)
    _damage(workdir, 2)
    with pytest.raises(ResumeError) as e:
        run(_settings(workdir, 6))
    message = str(e.value)
    assert message.startswith(f"no checkpoint in {workdir / 'checkpoints'} restores (step 4: ")
    assert "; step 2: " in message and "\n" not in message
    assert not (workdir / "skipped_checkpoints").exists()  # nothing moved: nothing resumed
    assert _logged_steps(workdir) == [1, 2, 3, 4]  # and nothing trained from scratch


def test_remat_is_not_another_model_and_a_changed_train_config_is_a_warning(workdir, capsys):
    settings = _settings(workdir, 5, remat="none")
    settings = dataclasses.replace(
        settings, train_config=settings.train_config.replace(learning_rate=5e-4)
    )
    run(settings)
    out, err = capsys.readouterr()
    assert "resuming from step 4 in" in out
    assert (
        "warning: this run's TrainConfig differs from step 4's in learning_rate (0.001 there, "
        "0.0005 here); going on with this run's"
    ) in err
    assert _logged_steps(workdir) == [1, 2, 3, 4, 5]


def test_an_unwritable_workdir_is_refused_before_any_weights_load(tmp_path):
    (tmp_path / "file").write_text("x")
    settings = _settings(tmp_path / "file" / "run", 1, init="/no/checkpoint/to/load")
    with pytest.raises(OutputError, match=r"^--workdir .*/file/run: .*/file is a file, not a"):
        run(settings)


def test_another_model_is_refused_in_one_line_before_its_state_is_restored(workdir):
    """Before: a different --model gave an orbax shape traceback. --model=tiny is the whole
    preset; the run in the workdir trained a one-layer one."""
    proc = _train_cli(
        f"--workdir={workdir}", "--num_steps=6", "--size=32*32", "--frame_num=5", "--model=tiny"
    )
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {workdir} holds checkpoints of another model (step 4 ")
    assert "num_layers (1 there, " in last and last.endswith("or use a new --workdir")
    assert "Traceback" not in err


def test_a_checkpoint_older_than_linear_quant_reads_as_none_and_fp8_names_its_flag(workdir):
    """A workdir saved before WanConfig.linear_quant existed (no such key in its meta) was
    trained with "none": resuming it with --linear_quant fp8 names the flag, and the saved
    value reads as 'none', not None (which would refuse every such workdir as another model)."""
    for meta in (workdir / "checkpoints").glob("*/meta/metadata"):
        saved = json.loads(meta.read_text())
        del saved["model_config"]["linear_quant"]
        meta.write_text(json.dumps(saved))
    with pytest.raises(ResumeError) as e:
        run(_settings(workdir, 6, linear_quant="fp8"))
    message = str(e.value)
    assert "(step 4 differs in linear_quant ('none' there, 'fp8' here))" in message
    assert "pass the --model and --linear_quant it was trained with" in message
