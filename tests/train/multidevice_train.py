"""Run by test_train_app in a subprocess with 8 forced CPU devices: trains the same 3 steps on a
(2, 2, 2) mesh and on one device, and prints JSON of the largest relative differences."""

import json
import os
import sys
import tempfile
from pathlib import Path

assert "--xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fpsa_jax.attention import FPSAConfig, Phase, StepSchedule  # noqa: E402
from fpsa_jax.config import WanConfig  # noqa: E402
from fpsa_jax.model.wan import init_params  # noqa: E402
from fpsa_jax.training import TrainConfig, init_train_state  # noqa: E402
from train.checkpoints import Checkpoints  # noqa: E402
from train.loop import RunSettings, run  # noqa: E402

MODEL = WanConfig.preset("tiny", num_layers=1, text_len=8, dtype="float32")
WINDOWED = FPSAConfig(tile=(1, 2, 2), window=(1, 1, 1), quant="fp8")
TRAIN = TrainConfig(
    warmup_steps=1,
    learning_rate=1e-3,
    adam_eps=1e-6,
    compute_dtype="float32",
    schedule=StepSchedule((Phase(0.5, WINDOWED), Phase(1.0, None))),
)
STEPS = 3


def train(workdir: Path, mesh_shape) -> tuple[list[dict], dict]:
    settings = RunSettings(
        workdir=workdir,
        model_config=MODEL,
        train_config=TRAIN,
        num_steps=STEPS,
        save_every=STEPS,
        batch_size=4,
        frames=5,
        height=32,
        width=32,
        mesh_shape=mesh_shape,
    )
    run(settings)
    rows = [
        dict(zip(lines[0].split(","), map(float, r.split(",")), strict=True))
        for lines in [(workdir / "metrics.csv").read_text().splitlines()]
        for r in lines[1:]
    ]
    template = init_train_state(
        MODEL, TRAIN, init_params(MODEL, jax.random.key(0)), jax.random.key(0)
    )
    checkpoints = Checkpoints(workdir, keep=1)
    state = checkpoints.restore(STEPS, template)[0]
    checkpoints.close()
    return rows, jax.tree.map(np.asarray, state.params)


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


with tempfile.TemporaryDirectory() as tmp:
    sharded_rows, sharded = train(Path(tmp) / "mesh", (2, 2, 2))
    single_rows, single = train(Path(tmp) / "one", (1, 1, 1))
print(
    json.dumps(
        {
            "phases": [r["phase"] for r in single_rows],
            "same_phases": [r["phase"] for r in sharded_rows] == [r["phase"] for r in single_rows],
            "loss": max(
                rel(np.float64(a["loss"]), np.float64(b["loss"]))
                for a, b in zip(sharded_rows, single_rows, strict=True)
            ),
            "grad_norm": max(
                rel(np.float64(a["grad_norm"]), np.float64(b["grad_norm"]))
                for a, b in zip(sharded_rows, single_rows, strict=True)
            ),
            "params": max(jax.tree.leaves(jax.tree.map(rel, sharded, single))),
            "params_moved": max(
                jax.tree.leaves(
                    jax.tree.map(
                        lambda a, b: float(np.abs(a - b).max()),
                        single,
                        jax.tree.map(np.asarray, init_params(MODEL, jax.random.key(0))),
                    )
                )
            ),
        }
    )
)
