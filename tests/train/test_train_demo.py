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
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode != 0 and "no checkpoints" in result.stderr
