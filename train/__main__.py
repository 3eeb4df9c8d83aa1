"""`python -m train`: quantization-aware FPSA fine-tuning of the Wan2.1 DiT (flow matching).

Hyper-parameters come from a TrainConfig JSON (--config; defaults: the paper's recipe) with
--set overrides; the run's shape (model, data, steps, checkpoints) from the flags below. A
workdir holds checkpoints/ (orbax, keep-last-N, async), metrics.csv and tb/ (TensorBoard); running
the same command again resumes from its latest checkpoint.

    python -m train --workdir runs/demo --model tiny --schedule wan-480p --num_steps 200
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags, logging

from fpsa_jax import cli
from fpsa_jax.attention import IMPLS
from fpsa_jax.config import LINEAR_QUANTS
from fpsa_jax.ranges import Range

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints, metrics.csv, tb/. Re-running resumes from it."
)
_CONFIG = flags.DEFINE_string(
    "config", None, "TrainConfig JSON (TrainConfig.to_json); omitted = the paper's recipe."
)
_SET = flags.DEFINE_multi_string(
    "set",
    [],
    "Override one TrainConfig field, KEY=VALUE with a JSON value (repeatable), e.g. "
    "--set learning_rate=1e-4 --set warmup_steps=10.",
)
_MODEL = flags.DEFINE_string(
    "model",
    "tiny",
    "A WanConfig preset (tiny, demo, t2v-1.3b, t2v-14b) to start from fresh weights, "
    "or a checkpoint: a `python -m fpsa_jax.convert` directory, a demo checkpoint "
    "(.safetensors of fpsa_jax.demo) or a Wan2.1 DiT checkpoint.",
)
_SCHEDULE = flags.DEFINE_string(
    "schedule",
    None,
    "FPSA StepSchedule: a preset (wan-480p, wan-720p, demo, dense) or a JSON file. "
    "Omitted = the config's (dense when it has none).",
)
_DATA = flags.DEFINE_string(
    "data",
    "synthetic",
    "'synthetic' (stand-in latents of moving-shape clips, no files), 'demo' (the demo "
    "model's pixel-space moving shapes, 9 frames of 32x32; use with --model demo) or a "
    "records directory written by `python -m train.prepare`.",
)
_SIZE = flags.DEFINE_string("size", "64*64", "Synthetic clips: WIDTH*HEIGHT in pixels.")
_FRAME_NUM = flags.DEFINE_integer("frame_num", 17, "Synthetic clips: frames, 4k+1.")
_COUNT = Range(1, integer=True)
_BATCH_SIZE = cli.check_range(
    flags.DEFINE_integer(
        "batch_size", 1, "Samples per step and host; divisible by the mesh's DATA x FSDP."
    ),
    _COUNT,
)
_NUM_STEPS = cli.check_range(
    flags.DEFINE_integer("num_steps", 100, "Train until this step (micro-steps)."), _COUNT
)
_SAVE_EVERY = cli.check_range(
    flags.DEFINE_integer("save_every", 50, "Checkpoint every N steps (and at the end)."), _COUNT
)
_KEEP = cli.check_range(flags.DEFINE_integer("keep", 3, "Checkpoints kept (the newest N)."), _COUNT)
_LOG_EVERY = cli.check_range(
    flags.DEFINE_integer("log_every", 1, "Log metrics every N steps."), _COUNT
)
_SEED = cli.check_range(
    flags.DEFINE_integer(
        "seed", 0, "Seed of the weights (fresh), data order and noise; in [0, 2^63)."
    ),
    Range(0, 2**63, hi_open=True, integer=True),
)
_ATTENTION_IMPL = flags.DEFINE_enum(
    "attention_impl",
    "xla",
    IMPLS,
    "FPSA operator implementation for training (xla is differentiable).",
)

_MESH = flags.DEFINE_string(
    "mesh",
    "1,1,1",
    "Device mesh DATA,FSDP,SEQ: batch over data x fsdp, parameters FSDP over "
    "fsdp, self-attention sequence-parallel (Ulysses) over seq; uses the first D*F*S devices.",
)

_REMAT = flags.DEFINE_enum(
    "remat",
    "full",
    ["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"],
    "Per-block rematerialisation: recompute activations in the backward pass to save memory.",
)

_LINEAR_QUANT = flags.DEFINE_enum(
    "linear_quant",
    None,
    LINEAR_QUANTS,
    "fp8: fine-tune with FP8 (E4M3) block linears, fake-quantized with straight-through "
    "gradients (QAT of the linears, beside the attention's). Omitted = the model's own.",
)

flags.mark_flag_as_required("workdir")


def _train_config():
    from fpsa_jax.attention import StepSchedule
    from fpsa_jax.training import TrainConfig

    try:
        fields = json.loads(Path(_CONFIG.value).read_text()) if _CONFIG.value else {}
    except (OSError, json.JSONDecodeError) as e:
        raise app.UsageError(f"--config {_CONFIG.value}: {e}") from None
    for item in _SET.value:
        key, sep, value = item.partition("=")
        if not sep:
            raise app.UsageError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value  # a bare string, e.g. --set lr_schedule=cosine
    schedule = None
    if _SCHEDULE.value:
        try:
            schedule = StepSchedule.load(_SCHEDULE.value)
        except (OSError, ValueError) as e:
            raise app.UsageError(f"--schedule {_SCHEDULE.value}: {e}") from None
    try:
        config = TrainConfig.from_dict(fields)
        return config if schedule is None else config.replace(schedule=schedule)
    except (TypeError, ValueError) as e:
        raise app.UsageError(f"bad training config: {e}") from None


def _check_before_work(settings) -> None:
    """What `run` would find wrong before any weights load, as one line naming the flag: the
    workdir, the --model's config (read without its weights), the --mesh against the devices,
    --batch_size, the model's heads and the clips' tokens."""
    from fpsa_jax.outputs import OutputError
    from train.checkpoints import check_workdir
    from train.loop import check_mesh, initial_config

    try:
        check_workdir(settings.workdir)
    except OutputError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        config = initial_config(settings)
    except (OSError, ValueError) as e:
        raise app.UsageError(f"--model {_MODEL.value}: {e}") from None
    try:
        check_mesh(settings, config)
    except ValueError as e:
        raise app.UsageError(f"--mesh {_MESH.value}: {e}") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    from fpsa_jax.config import PRESETS, WanConfig
    from fpsa_jax.pipeline import check_video_request
    from train.loop import RunSettings, run

    width, _, height = _SIZE.value.partition("*")
    try:
        width, height = int(width), int(height)
        check_video_request(width, height, _FRAME_NUM.value)
    except ValueError as e:
        raise app.UsageError(f"--size/--frame_num: {e}") from None
    try:
        mesh_shape = tuple(int(x) for x in _MESH.value.split(","))
    except ValueError:
        mesh_shape = ()
    if len(mesh_shape) != 3 or min(mesh_shape) < 1:
        raise app.UsageError(f"--mesh must be DATA,FSDP,SEQ positive ints, got {_MESH.value!r}")
    train_config = _train_config()
    if _MODEL.value.lower() in PRESETS:
        model_config, init = WanConfig.preset(_MODEL.value), "preset"
    elif Path(_MODEL.value).exists():
        model_config, init = None, _MODEL.value
    else:
        raise app.UsageError(
            f"--model {_MODEL.value!r} is neither a preset ({', '.join(PRESETS)}) nor a path"
        )
    if _DATA.value not in ("synthetic", "demo") and not Path(_DATA.value, "index.json").is_file():
        raise app.UsageError(
            f"--data {_DATA.value}: not 'synthetic' or 'demo' and no records index.json"
        )
    settings = RunSettings(
        workdir=Path(_WORKDIR.value),
        model_config=model_config,
        train_config=train_config,
        init=init,
        data=_DATA.value,
        batch_size=_BATCH_SIZE.value,
        num_steps=_NUM_STEPS.value,
        save_every=_SAVE_EVERY.value,
        keep=_KEEP.value,
        log_every=_LOG_EVERY.value,
        seed=_SEED.value,
        frames=_FRAME_NUM.value,
        height=height,
        width=width,
        attention_impl=_ATTENTION_IMPL.value,
        mesh_shape=mesh_shape,
        remat=_REMAT.value,
        linear_quant=_LINEAR_QUANT.value,
    )
    from fpsa_jax.outputs import OutputError, stop_on_signals
    from train.resume import ResumeError

    _check_before_work(settings)
    try:
        with stop_on_signals():  # SIGTERM: pending saves finish, logs close, as for Ctrl-C
            last = run(settings)
    except (OutputError, ResumeError) as e:
        raise SystemExit(f"error: {e}") from None
    print("last step: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()))
    print(f"checkpoints and logs in {settings.workdir.resolve()}")


if __name__ == "__main__":
    cli.run(main)
