"""The demo model's recipe end to end at toy size: dense training on the demo task, export of the
EMA weights to a demo checkpoint, FPSA fine-tuning from that file (the commands in RESULTS.md;
the demo's three-phase schedule is replaced by a one-phase one to compile once)."""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from fpsa_jax.attention import FPSAConfig, StepSchedule
from fpsa_jax.config import WanConfig
from fpsa_jax.demo import load_demo
from fpsa_jax.training import TrainConfig
from tests.conftest import subprocess_env
from train.export_demo import export
from train.loop import RunSettings, run

ROOT = Path(__file__).resolve().parents[2]
ONE_PHASE = StepSchedule(((1.0, FPSAConfig(tile=(3, 2, 2), window=(3, 2, 2), quant="fp8")),))
SMALL = WanConfig.preset("demo", dim=32, ffn_dim=64, num_heads=2, num_layers=1)
TRAIN = TrainConfig(
    warmup_steps=1,
    learning_rate=1e-3,
    compute_dtype="float32",
    cast_params=False,
    num_inference_steps=20,
    inference_shift=3.0,
)


def test_dense_then_fpsa_fine_tuning_through_a_demo_checkpoint(tmp_path):
    common = dict(data="demo", batch_size=2, save_every=2, remat="none")
    dense_dir, qat_dir = tmp_path / "dense", tmp_path / "qat"
    last = run(RunSettings(dense_dir, SMALL, TRAIN, num_steps=2, **common))
    assert np.isfinite(last["loss"])
    assert export(dense_dir, tmp_path / "dense.safetensors")[0] == 2
    dense = load_demo(tmp_path / "dense.safetensors")
    assert dense.config == SMALL and dense.schedule is None and dense.info["step"] == 2
    assert dense.sampling.num_steps == 20 and dense.sampling.shift == 3.0

    fpsa = TRAIN.replace(schedule=ONE_PHASE)  # one phase: one compilation
    init = str(tmp_path / "dense.safetensors")
    run(RunSettings(qat_dir, None, fpsa, init=init, num_steps=2, **common))
    export(qat_dir, tmp_path / "qat.safetensors")
    qat = load_demo(tmp_path / "qat.safetensors")
    assert qat.schedule == ONE_PHASE and qat.info["step"] == 2
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(qat.params), jax.tree.leaves(dense.params), strict=True)
    ]
    assert any(moved)  # fine-tuning started from the dense weights and changed them


def test_export_cli_refuses_a_run_without_checkpoints(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "train.export_demo", f"--workdir={tmp_path}", "--out=x.safetensors"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(),
    )
    assert result.returncode != 0 and "no checkpoints" in result.stderr


def test_export_summary_reads_a_run_logged_every_n_steps(tmp_path):
    """With --log_every 100 the loss mean covers the logged steps of the last 500 and the time
    is the mean logged step time times the step count (not a sum over logged rows only)."""
    from train.export_demo import _loss_summary
    from train.logs import FIELDS

    rows = [
        dict.fromkeys(FIELDS, 0.0) | dict(step=s, loss=s / 1000, step_time_s=0.5)
        for s in range(100, 1100, 100)
    ]
    with (tmp_path / "metrics.csv").open("w") as f:
        f.write(",".join(FIELDS) + "\n")
        f.writelines(",".join(str(r[k]) for k in FIELDS) + "\n" for r in rows)
    summary = _loss_summary(tmp_path, step=900)
    assert summary["logged_steps_in_mean"] == 5  # steps 500..900
    np.testing.assert_allclose(summary["mean_loss_last_500_steps"], 0.7)
    np.testing.assert_allclose(summary["train_seconds"], 450.0)


def test_metrics_log_writes_the_csv_without_tensorboardx(tmp_path, monkeypatch):
    from train.logs import MetricsLog

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import raises ImportError
    log = MetricsLog(tmp_path)
    log.write(3, {"loss": 0.5, "phase": 0, "phase_loss": 0.5})
    log.close()
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,loss") and lines[1].startswith("3,0.5")
    assert not (tmp_path / "tb").exists()
