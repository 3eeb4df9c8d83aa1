"""`python -m train`: resume is exact, a kill mid-save never corrupts the last checkpoint, logs
are written, bad flags are refused."""

import dataclasses
import gc
import json
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import jax
import numpy as np
import pytest

from fpsa_jax.attention import IMPLS, FPSAConfig, Phase, StepSchedule
from fpsa_jax.config import WanConfig
from fpsa_jax.parallel import make_mesh
from fpsa_jax.training import TrainConfig
from train.checkpoints import Checkpoints
from train.loop import RunSettings, _Layout, _step_programs, run

ROOT = Path(__file__).resolve().parents[2]
MODEL = WanConfig.preset("tiny", num_layers=1, text_len=8)
TRAIN = TrainConfig(warmup_steps=1, learning_rate=1e-3, compute_dtype="float32")


def _settings(workdir, num_steps, **kw):
    return RunSettings(
        workdir=workdir,
        model_config=MODEL,
        train_config=TRAIN,
        num_steps=num_steps,
        save_every=2,
        frames=5,
        height=32,
        width=32,
        batch_size=2,
        **kw,
    )


def _final_state(workdir, step):
    settings = _settings(workdir, step)
    from fpsa_jax.model.wan import init_params
    from fpsa_jax.training import init_train_state

    template = init_train_state(
        MODEL, TRAIN, init_params(MODEL, jax.random.key(0)), jax.random.key(0)
    )
    checkpoints = Checkpoints(settings.workdir, keep=3)
    try:
        return checkpoints.restore(step, template)
    finally:
        checkpoints.close()


def test_resume_continues_bit_for_bit(tmp_path):
    run(_settings(tmp_path / "straight", 4))
    run(_settings(tmp_path / "resumed", 2))
    run(_settings(tmp_path / "resumed", 4))  # same workdir: resumes from step 2
    (a, data_a, _), (b, data_b, _) = (
        _final_state(tmp_path / "straight", 4),
        _final_state(tmp_path / "resumed", 4),
    )
    assert data_a == data_b
    for x, y in zip(
        jax.tree.leaves(jax.random.key_data(a.rng)),
        jax.tree.leaves(jax.random.key_data(b.rng)),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)
    for name in ("params", "ema_params", "opt_state"):
        for x, y in zip(
            jax.tree.leaves(getattr(a, name)), jax.tree.leaves(getattr(b, name)), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int(a.step) == int(b.step) == 4
    # and the run actually trained: params moved away from their initial values
    initial = _final_state(tmp_path / "straight", 2)[0]
    assert any(
        not np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(initial.params), jax.tree.leaves(a.params), strict=True)
    )


def test_logs_record_every_step_with_its_phase(tmp_path):
    windowed = FPSAConfig(tile=(1, 2, 2), window=(1, 1, 1))
    schedule = StepSchedule((Phase(0.5, windowed), Phase(1.0, None)))
    settings = dataclasses.replace(
        _settings(tmp_path, 3, log_every=1), train_config=TRAIN.replace(schedule=schedule)
    )
    last = run(settings)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,grad_norm,learning_rate,phase")
    assert len(rows) == 4 and last["phase"] in (0, 1) and np.isfinite(last["loss"])
    assert {int(r.split(",")[4]) for r in rows[1:]} <= {0, 1}
    assert list((tmp_path / "tb").iterdir())


def test_trains_from_prepared_records(tmp_path):
    prep = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.prepare",
            "--synthetic=4",
            f"--out_dir={tmp_path / 'rec'}",
            "--size=32*32",
            "--frame_num=5",
            f"--standin_text_dim={MODEL.text_dim}",
        ],
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert prep.returncode == 0, prep.stderr[-2000:]
    last = run(_settings(tmp_path / "w", 2, data=str(tmp_path / "rec")))
    assert np.isfinite(last["loss"]) and (tmp_path / "w" / "checkpoints" / "2").is_dir()


def test_training_on_a_2x2x2_mesh_matches_one_device():
    """Loss, gradient norm and updated parameters of 3 steps (FP8 windowed and dense phases) on a
    (data, fsdp, seq) = (2, 2, 2) mesh of 8 CPU devices against one device."""
    env = {
        "PATH": "/usr/bin:/bin",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    }
    script = Path(__file__).with_name("multidevice_train.py")
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    diffs = json.loads(result.stdout.strip().splitlines()[-1])
    assert diffs["same_phases"] and diffs["params_moved"] > 1e-4
    # float32 with a different reduction order: a few ulps on loss and gradient norm.
    assert diffs["loss"] < 1e-5 and diffs["grad_norm"] < 1e-5
    # Adam divides by sqrt(v) + eps (1e-6 here), so near-zero gradient entries turn reduction-order
    # noise into update noise of up to lr * noise / eps; 1e-4 of each leaf's scale bounds it.
    assert diffs["params"] < 1e-4


def _train_cli(*flags, **kw):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", "train", *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_a_kill_during_saves_leaves_the_last_checkpoint_restorable(tmp_path):
    work = tmp_path / "run"
    flags = [
        f"--workdir={work}",
        "--num_steps=100000",
        "--save_every=1",
        "--size=32*32",
        "--frame_num=5",
        "--set=warmup_steps=1",
    ]
    proc = _train_cli(*flags)
    ckpt = work / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in ckpt.glob("*") if p.name.isdigit()] if ckpt.exists() else []
        if len(done) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    os.kill(proc.pid, signal.SIGKILL)  # saves run every step: this lands in or near one
    proc.wait()
    steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    last = steps[-1]
    # Resuming restores the newest complete checkpoint and trains one more step.
    resumed = _train_cli(
        *[f for f in flags if not f.startswith("--num_steps")], f"--num_steps={last + 1}"
    )
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-2000:]
    assert f"resuming from step {last}" in out


def test_step_programs_are_made_once_per_operator_and_go_with_their_run():
    layout = _Layout(make_mesh(1, 1, 1, devices=jax.devices()[:1]), None, None)
    programs = _step_programs(MODEL, TRAIN, "xla", layout)  # jit is lazy: nothing compiles
    dense = programs(None)
    assert programs(None) is dense
    assert programs(FPSAConfig(tile=(1, 2, 2), window=(1, 1, 1))) is not dense
    gone = weakref.ref(dense)
    del programs, dense
    gc.collect()
    assert gone() is None  # no module-level cache keeps a finished run's programs


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--model=huge"], "neither a preset"),
        (["--size=30*32"], "multiples of 16"),
        (["--set=learning_rate"], "--set takes KEY=VALUE"),
        (["--set=warmup_step=3"], "unknown TrainConfig fields"),
        (["--schedule=wan-9000p"], "unknown StepSchedule preset"),
        (["--schedule=/no/schedule.json"], "StepSchedule file not found"),
        (["--data=/no/records"], "no records index.json"),
        (["--num_steps=0"], "--num_steps must be >= 1"),
        # Checked while the flags parse, before the (missing) checkpoint or the workdir is touched.
        (
            ["--attention_impl=nonsense", "--model=/no/checkpoint"],
            f"value should be one of <{'|'.join(IMPLS)}>",
        ),
        (["--linear_quant=int8"], "value should be one of <none|fp8>"),
    ],
)
def test_bad_flags_are_refused_with_the_reason(tmp_path, flags, message):
    proc = _train_cli(f"--workdir={tmp_path / 'w'}", *flags)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and message in err
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_help_lists_every_attention_impl():
    out, _ = _train_cli("--help").communicate(timeout=120)
    assert f"--attention_impl: <{'|'.join(IMPLS)}>" in out


def test_an_unknown_impl_or_linear_quant_is_refused_when_the_run_is_described(tmp_path):
    with pytest.raises(ValueError, match=r"unknown impl 'nonsense'; valid: auto, reference"):
        _settings(tmp_path / "w", 1, attention_impl="nonsense", init="/no/checkpoint")
    assert not (tmp_path / "w").exists()
    with pytest.raises(ValueError, match=r"RunSettings.linear_quant must be None or one of"):
        _settings(tmp_path / "w", 1, linear_quant="int8", init="/no/checkpoint")
    assert not (tmp_path / "w").exists()


def test_fp8_linear_qat_records_its_config_and_fp8_checkpoints_are_refused(tmp_path):
    last = run(_settings(tmp_path / "qat", 1, linear_quant="fp8"))
    assert np.isfinite(last["loss"]) and np.isfinite(last["grad_norm"])
    assert _final_state(tmp_path / "qat", 1)[2]["model_config"]["linear_quant"] == "fp8"

    from fpsa_jax.convert import save_converted
    from fpsa_jax.model.fp8_linear import quantize_linear_weights
    from fpsa_jax.model.wan import init_params

    fp8 = MODEL.replace(linear_quant="fp8")
    save_converted(
        tmp_path / "fp8", fp8, quantize_linear_weights(init_params(MODEL, jax.random.key(0)))
    )
    settings = dataclasses.replace(
        _settings(tmp_path / "w", 1), model_config=None, init=str(tmp_path / "fp8")
    )
    with pytest.raises(ValueError, match="holds FP8 block linears .*training needs the float"):
        run(settings)
