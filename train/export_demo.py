"""`python -m train.export_demo`: a training run's EMA parameters -> a demo checkpoint file.

    python -m train.export_demo --workdir runs/demo-qat \
        --out fpsa_jax/assets/demo/fpsa-qat.safetensors

Writes the EMA parameters (float32) of the run's latest checkpoint (or --step) with the run's
WanConfig, the FPSA schedule it trained with (its TrainConfig's), sampling settings matching the
schedule's step mapping (num_inference_steps, inference_shift) and provenance (step, mean loss of
the last 100 logged steps) into one .safetensors file that `fpsa_jax.demo.load_demo` reads.
"""

from __future__ import annotations

import csv
from pathlib import Path

from absl import app, flags, logging

from fpsa_jax import cli
from fpsa_jax.ranges import Range

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of `python -m train`.")
_OUT = flags.DEFINE_string("out", None, "Output .safetensors path.")
_STEP = cli.check_range(
    flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest."),
    Range(1, integer=True),
)
_GUIDE_SCALE = cli.check_range(
    flags.DEFINE_float("guide_scale", 4.0, "Default CFG scale stored with the model."), Range(0)
)
_NOTE = flags.DEFINE_string("note", "", "Free text stored in the checkpoint's provenance.")
flags.mark_flags_as_required(["workdir", "out"])


def _loss_summary(workdir: Path, step: int, window: int = 500) -> dict[str, float]:
    """Loss over the logged steps in (step - window, step] and the time spent in steps.

    The run may log every N steps (--log_every), so the mean is over the logged ones and the step
    time is the logged steps' mean times `step` (device time; input waits excluded).
    """
    path = workdir / "metrics.csv"
    if not path.is_file():
        return {}
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    last = [r for r in rows if int(r["step"]) > step - window]
    if not last:
        return {}
    step_time = sum(float(r["step_time_s"]) for r in rows) / len(rows)
    return {
        f"mean_loss_last_{window}_steps": sum(float(r["loss"]) for r in last) / len(last),
        "logged_steps_in_mean": len(last),
        "train_seconds": step_time * step,
    }


def check_step(workdir: Path, step: int | None) -> int:
    """`step`, or the latest step when None, once `workdir` is known to hold a checkpoint of it;
    else ValueError naming the steps it holds. Reads no state and creates nothing."""
    from train.checkpoints import saved_steps

    if not Path(workdir).is_dir():
        raise ValueError(f"{workdir}: not a directory (the --workdir of a `python -m train` run)")
    steps = saved_steps(workdir)
    if not steps:
        raise ValueError(f"{workdir}: no checkpoints")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ValueError(
            f"{workdir} has no checkpoint of step {step} (--step); its steps: "
            + ", ".join(map(str, steps))
        )
    return step


def export(
    workdir: Path, out: Path, step: int | None = None, guide_scale: float = 4.0, note: str = ""
) -> tuple[int, Path]:
    """Writes the EMA parameters of `step` (default: the latest) of the run in `workdir` to the
    demo checkpoint `out`; returns (step, path). Raises ValueError when there is no checkpoint."""
    import jax

    from fpsa_jax.config import WanConfig
    from fpsa_jax.demo import DemoCheckpoint, Sampling, save_demo
    from fpsa_jax.model.wan import init_params
    from fpsa_jax.training import TrainConfig, init_train_state
    from train.checkpoints import Checkpoints

    step = check_step(workdir, step)
    if Path(out).suffix != ".safetensors":
        raise ValueError(f"demo checkpoints are .safetensors files, got {out}")
    checkpoints = Checkpoints(workdir, keep=1_000_000)
    try:
        meta = checkpoints.restore_meta(step)
        model_config = WanConfig.from_dict(meta["model_config"])
        train_config = TrainConfig.from_dict(meta["train_config"])
        params = init_params(model_config, jax.random.key(0))
        template = init_train_state(model_config, train_config, params, jax.random.key(0))
        state, _, _ = checkpoints.restore(step, template)
    finally:
        checkpoints.close()
    checkpoint = DemoCheckpoint(
        config=model_config.replace(remat="none"),
        params=jax.device_get(state.ema_params),
        schedule=train_config.schedule,
        sampling=Sampling(
            num_steps=train_config.num_inference_steps,
            shift=train_config.inference_shift,
            guide_scale=guide_scale,
        ),
        info={
            "run": workdir.name,
            "step": int(step),
            "params": "EMA",
            "ema_decay": train_config.ema_decay,
            **_loss_summary(workdir, step),
            **({"note": note} if note else {}),
        },
    )
    return int(step), save_demo(out, checkpoint)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from fpsa_jax.outputs import Output, OutputError, check_outputs

    workdir, out = Path(_WORKDIR.value), Path(_OUT.value)
    if out.suffix != ".safetensors":
        raise app.UsageError(f"--out must end in .safetensors, got {out}")
    try:
        step = check_step(workdir, _STEP.value)  # before any state is built
        check_outputs([Output("--out", out)])
    except OutputError as e:
        raise SystemExit(f"error: {e}") from None
    except ValueError as e:  # its message starts with the workdir
        raise app.UsageError(f"--workdir {e}") from None
    try:
        step, path = export(workdir, out, step, _GUIDE_SCALE.value, _NOTE.value)
    except ValueError as e:
        raise app.UsageError(f"--workdir {workdir}: {e}") from None
    print(f"wrote step {step} of {workdir} ({path.stat().st_size / 1e6:.1f} MB) to {path}")


if __name__ == "__main__":
    cli.run(main)
