"""What `python -m train.calibrate` does with its flags: check them all (`parse_request`, no
model touched), then load the model, measure, select and write (`run`).

Every error a user can cause by a flag is an `app.UsageError` raised by `parse_request`, naming
the flag, before any weights load. Outputs (schedule JSON, CSV, PNG) are rendered in memory and
written through temporary files that are renamed into place only when all of them are written,
so a failure leaves none of them behind, half-written or not.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from absl import app

from fpsa_jax.attention import FPSAConfig, StepSchedule
from fpsa_jax.attention.calibration import (
    Calibration,
    StepErrors,
    candidate_configs,
)
from train import calibration_outputs as outputs

# The demo task's clip (fpsa_jax.demo.task: 9 frames of 32 x 32) and the demo preset's patch.
_DEMO_VIDEO, _DEMO_PATCH = (9, 32, 32), (1, 4, 4)
_WAN_SIZE, _WAN_FRAMES = "832*480", 81
_SEED_LIMIT = 2**32  # jax.random.key(2**32) is key(0): larger seeds would alias
# Demo captions of the training distribution (none held out: the evaluation's are left alone).
DEMO_PROMPTS = ("a red square moves left quickly", "a blue circle moves up slowly")


@dataclasses.dataclass(frozen=True)
class Request:
    """The checked flags. `grid` is the token grid the candidates are built for (Wan's from the
    video size, the demo's from its clip); `derived` is the schedule of --phase_densities (then
    nothing is measured). None sampling settings take the demo checkpoint's own."""

    ckpt_dir: Path | None
    demo_checkpoint: Path | None
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    negative_prompt: str
    video: tuple[int, int, int]  # frames, height, width
    grid: tuple[int, int, int]
    num_steps: int | None
    shift: float | None
    guide_scale: float | None
    solver: str
    tile: tuple[int, int, int]
    candidates: tuple[FPSAConfig | None, ...]
    # (densities, groups, quants, smooth_k values): candidate_configs' arguments after the tile
    # and grid.
    candidate_spec: tuple[
        tuple[float, ...], tuple[tuple[int, int, int], ...], tuple[str, ...], tuple[bool, ...]
    ]
    max_rel_l2: float | None
    density: float | None
    max_phases: int
    derived: StepSchedule | None
    output: Path
    plot: Path | None
    csv: Path | None
    attention_impl: str
    notes: tuple[str, ...] = ()


# --smooth_k: which FPSAConfig.smooth_k values the FP8 candidates take.
_SMOOTH_K_CHOICES = {"off": (False,), "on": (True,), "both": (False, True)}


def _usage(flag: str, message: str) -> app.UsageError:
    return app.UsageError(f"--{flag}: {message}")


def _floats(flag: str, text: str, lo_open: float, hi: float) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise _usage(flag, f"expected comma-separated numbers, got {text!r}") from None
    for v in values:
        if not (math.isfinite(v) and lo_open < v <= hi):
            raise _usage(flag, f"every value must be in ({lo_open:g}, {hi:g}], got {v}")
    return values


def _int3(flag: str, text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    try:
        values = tuple(int(x) for x in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise _usage(flag, f"expected TxHxW of positive ints (e.g. 2x2x2), got {text!r}")
    return values  # type: ignore[return-value]


def _positive(flag: str, value: float | None, allow_zero: bool = False) -> None:
    if value is not None and not (
        math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    ):
        bound = ">= 0" if allow_zero else "> 0"
        raise _usage(flag, f"must be a finite number {bound}, got {value}")


def _output(flag: str, value: str | None, suffix: str, overwrite: bool) -> Path | None:
    if not value:
        return None
    path = Path(value).expanduser()
    if path.suffix.lower() != suffix:
        raise _usage(flag, f"must end in {suffix}, got {value}")
    if path.is_dir():
        raise _usage(flag, f"{value} is a directory")
    if path.exists() and not overwrite:
        raise _usage(flag, f"{value} exists; pass --overwrite to replace it")
    parent = next(p for p in (path.parent, *path.parent.parents) if p.exists() or p == Path("."))
    if not parent.is_dir():
        raise _usage(flag, f"cannot create {value}: {parent} is not a directory")
    if not outputs.writable(parent):
        raise _usage(flag, f"cannot write to {parent}")
    return path


def _prompts(v: Mapping[str, Any], wan: bool) -> tuple[str, ...]:
    if not v["prompts"]:
        if wan:
            raise _usage("prompts", "required with --ckpt_dir (a text file, one prompt a line)")
        return DEMO_PROMPTS
    path = Path(v["prompts"]).expanduser()
    if not path.is_file():
        raise _usage("prompts", f"file not found: {v['prompts']}")
    try:
        prompts = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as e:
        raise _usage("prompts", f"cannot read {v['prompts']}: {e}") from None
    if not prompts:
        raise _usage("prompts", f"no prompts in {v['prompts']}")
    return prompts


def _video(v: Mapping[str, Any], wan: bool) -> tuple[int, int, int]:
    if not wan:
        return _DEMO_VIDEO
    from fpsa_jax.pipeline import check_video_request

    size = v["size"] or _WAN_SIZE
    width, sep, height = size.replace("x", "*").partition("*")
    try:
        width, height = int(width), int(height)
    except ValueError:
        raise _usage("size", f"must look like 832*480 (WIDTH*HEIGHT), got {size!r}") from None
    frames = _WAN_FRAMES if v["frame_num"] is None else v["frame_num"]
    try:
        check_video_request(width, height, frames)
    except ValueError as e:
        raise _usage("size/--frame_num", str(e)) from None
    return frames, height, width


def _token_grid(video: tuple[int, int, int], wan: bool) -> tuple[int, int, int]:
    if wan:  # Wan's VAE (4, 8, 8) then the DiT's (1, 2, 2) patch
        frames, height, width = video
        return (frames - 1) // 4 + 1, height // 16, width // 16
    return tuple(s // p for s, p in zip(video, _DEMO_PATCH, strict=True))  # type: ignore[return-value]


def parse_request(v: Mapping[str, Any]) -> Request:
    """The Request the flag values `v` ({flag name: value}) describe; app.UsageError naming the
    flag for anything wrong. Touches no model (only the prompts file and output folders)."""
    derive = _mode(v)
    seeds = _seeds(v)
    ckpt_dir = Path(v["ckpt_dir"]).expanduser() if v["ckpt_dir"] else None
    wan = ckpt_dir is not None or (derive and (v["size"] or v["frame_num"] is not None))
    demo_checkpoint = None if derive else _model_files(v, ckpt_dir)
    prompts = () if derive else _prompts(v, wan)
    video = _video(v, wan)
    grid = _token_grid(video, wan)
    tile = _tile(v, wan)
    spec = (
        _floats("densities", v["densities"], 0.0, 1.0),
        tuple(_int3("groups", g) for g in v["groups"].split(",")),
        tuple(dict.fromkeys(q.strip() for q in v["quant"].split(","))),
        _SMOOTH_K_CHOICES[v["smooth_k"]],
    )
    if not set(spec[2]) <= {"fp8", "none"}:
        raise _usage("quant", f"values must be fp8 or none, got {v['quant']!r}")
    candidates = candidate_configs(tile, grid, *spec)
    sparsest = min(1.0 if c is None else c.density(grid) for c in candidates)
    if not derive and v["density"] is not None and v["density"] < sparsest:
        raise _usage(
            "density",
            f"{v['density']} is below every candidate: the sparsest computes {sparsest:.1%} of "
            f"the tiles on the grid {grid} (add a smaller value to --densities)",
        )
    derived = _derived(v, tile, grid) if derive else None
    output, plot, csv, notes = _outputs(v, derive)
    wan_default = lambda value, default: default if value is None and wan else value  # noqa: E731
    return Request(
        ckpt_dir=ckpt_dir,
        demo_checkpoint=demo_checkpoint,
        prompts=prompts,
        seeds=seeds,
        negative_prompt=v["negative_prompt"],
        video=video,
        grid=grid,
        num_steps=wan_default(v["sample_steps"], 50),
        shift=wan_default(v["sample_shift"], 5.0),
        guide_scale=wan_default(v["sample_guide_scale"], 5.0),
        solver=v["sample_solver"],
        tile=tile,
        candidates=candidates,
        candidate_spec=spec,
        max_rel_l2=v["max_rel_l2"],
        density=v["density"],
        max_phases=v["max_phases"],
        derived=derived,
        output=output,
        plot=plot,
        csv=csv,
        attention_impl=v["attention_impl"],
        notes=notes,
    )


def _mode(v: Mapping[str, Any]) -> bool:
    """Checks the budget / target flags and the sampler's numbers; True for --phase_densities."""
    modes = [v["max_rel_l2"] is not None, v["density"] is not None, bool(v["phase_densities"])]
    if sum(modes) != 1:
        raise app.UsageError(
            "give exactly one of --max_rel_l2 (an error budget), --density (a mean density "
            "target) or --phase_densities (windows from density targets, nothing measured)"
        )
    _positive("max_rel_l2", v["max_rel_l2"])
    if v["density"] is not None and not (math.isfinite(v["density"]) and 0 < v["density"] <= 1):
        raise _usage("density", f"must be in (0, 1], got {v['density']}")
    if v["sample_steps"] is not None and v["sample_steps"] < 1:
        raise _usage("sample_steps", f"must be >= 1, got {v['sample_steps']}")
    if v["max_phases"] < 1:
        raise _usage("max_phases", f"must be >= 1, got {v['max_phases']}")
    _positive("sample_shift", v["sample_shift"])
    _positive("sample_guide_scale", v["sample_guide_scale"], allow_zero=True)
    return modes[2]


def _seeds(v: Mapping[str, Any]) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in v["seeds"].split(","))
    except ValueError:
        raise _usage("seeds", f"expected comma-separated ints, got {v['seeds']!r}") from None
    if any(not 0 <= s < _SEED_LIMIT for s in seeds):
        raise _usage("seeds", f"seeds must be in [0, 2^32), got {v['seeds']}")
    return seeds


def _model_files(v: Mapping[str, Any], ckpt_dir: Path | None) -> Path | None:
    """Checks that the model to measure is there; the demo checkpoint's path (None for Wan)."""
    if ckpt_dir is not None:
        from fpsa_jax.convert import find_model_files

        try:
            find_model_files(ckpt_dir)
        except FileNotFoundError as e:
            raise _usage("ckpt_dir", str(e)) from None
        return None
    for flag in ("size", "frame_num", "negative_prompt"):
        if v[flag] not in (None, ""):
            raise _usage(flag, "needs --ckpt_dir (the demo model has one clip size and no text)")
    from fpsa_jax.demo import DENSE_CHECKPOINT

    path = Path(v["demo_checkpoint"] or DENSE_CHECKPOINT).expanduser()
    if not path.is_file():
        raise _usage("demo_checkpoint", f"file not found: {v['demo_checkpoint']}")
    return path


def _tile(v: Mapping[str, Any], wan: bool) -> tuple[int, int, int]:
    if v["tile"]:
        return _int3("tile", v["tile"])
    return StepSchedule.preset("wan-480p" if wan else "demo").configs[0].tile


def _outputs(v: Mapping[str, Any], derive: bool):
    """(output, plot, csv, notes): the checked output paths (None: not written)."""
    overwrite = bool(v["overwrite"])
    output = _output("output", v["output"], ".json", overwrite)
    if output is None:
        raise _usage("output", "required: the StepSchedule .json to write")
    if derive:
        return output, None, None, ()
    paths = {}
    for flag, suffix in (("plot", ".png"), ("csv", ".csv")):
        value = str(output.with_suffix(suffix)) if v[flag] is None else v[flag]
        paths[flag] = _output(flag, value, suffix, overwrite)
    notes = ()
    if paths["plot"] is not None and importlib.util.find_spec("matplotlib") is None:
        notes = (
            f"note: matplotlib is not installed, so no {paths['plot'].name} (pip install "
            "'fpsa-jax[notebook]' for the plot); the CSV has the same numbers",
        )
        paths["plot"] = None
    return output, paths["plot"], paths["csv"], notes


def _derived(v: Mapping[str, Any], tile, grid) -> StepSchedule:
    """The --phase_densities schedule: FP8, the window nearest each phase's target on `grid`."""
    targets = _floats("phase_densities", v["phase_densities"], 0.0, 1.0)
    ends = _floats("phase_ends", v["phase_ends"], 0.0, 1.0)
    groups = tuple(_int3("phase_groups", g) for g in v["phase_groups"].split(","))
    if not len(targets) == len(ends) == len(groups):
        raise _usage(
            "phase_densities",
            f"needs one --phase_ends and one --phase_groups entry per phase: got "
            f"{len(targets)} densities, {len(ends)} ends, {len(groups)} groups",
        )
    try:
        return StepSchedule.from_densities(tile, grid, ends, targets, groups)
    except ValueError as e:
        raise _usage("phase_ends", str(e)) from None


@dataclasses.dataclass(frozen=True)
class Result:
    """What a run wrote and found (calibration / errors: None for --phase_densities)."""

    schedule: StepSchedule
    calibration: Calibration | None
    errors: StepErrors | None
    summary: str
    written: tuple[Path, ...]


def run(request: Request, progress_bar: bool = False) -> Result:
    """Measures and selects (or derives) the schedule and writes the outputs."""
    if request.derived is not None:
        written = outputs.write_all({request.output: request.derived.to_json() + "\n"})
        summary = outputs.describe_schedule(request.derived, request.grid)
        return Result(request.derived, None, None, summary, written)
    from fpsa_jax.attention.calibration import select_schedule

    errors, what = _measure(request, progress_bar)
    try:
        calibration = select_schedule(
            errors,
            max_rel_l2=request.max_rel_l2,
            density=request.density,
            max_phases=request.max_phases,
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    files = {request.output: calibration.schedule.to_json() + "\n"}
    if request.csv is not None:
        files[request.csv] = outputs.errors_csv(errors, calibration)
    if request.plot is not None:
        files[request.plot] = outputs.errors_png(errors, calibration, what)
    written = outputs.write_all(files)
    summary = outputs.describe_calibration(errors, calibration, what, request)
    return Result(calibration.schedule, calibration, errors, summary, written)


def _measure(request: Request, progress_bar: bool) -> tuple[StepErrors, str]:
    """(errors of the candidates, a few words on what was measured)."""
    from fpsa_jax.training.calibration import measure_step_errors

    if request.ckpt_dir is not None:
        config, params, samples, condition, settings = _wan_inputs(request)
        what = f"Wan2.1 {config.num_params() / 1e9:.1f}B at {request.video[2]}*{request.video[1]}"
    else:
        config, params, samples, condition, settings = _demo_inputs(request)
        what = f"demo model {request.demo_checkpoint.name}"
    grid = tuple(
        s // p for s, p in zip(samples[0].noise.shape[1:4], config.patch_size, strict=True)
    )
    candidates = request.candidates
    if grid != request.grid:  # a model with another patch: the windows are built for its grid
        candidates = candidate_configs(request.tile, grid, *request.candidate_spec)
    total = len(samples) * settings["num_steps"]
    bar = outputs.progress_bar(total) if progress_bar else None
    try:
        errors = measure_step_errors(
            config,
            params,
            samples,
            candidates,
            condition=condition,
            attention_impl=request.attention_impl,
            progress=None if bar is None else bar.update_to,
            **settings,
        )
    finally:
        if bar is not None:
            bar.close()
    n_p, n_s = len(request.prompts), len(request.seeds)
    what += f", {n_p} prompt{'s' * (n_p > 1)} x {n_s} seed{'s' * (n_s > 1)}"
    return errors, what


def _settings(request: Request, defaults) -> dict[str, Any]:
    return {
        "num_steps": request.num_steps or defaults.num_steps,
        "shift": request.shift if request.shift is not None else defaults.shift,
        "guide_scale": request.guide_scale
        if request.guide_scale is not None
        else defaults.guide_scale,
        "solver": request.solver,
    }


def _demo_inputs(request: Request):
    from fpsa_jax.demo import load_demo, task
    from fpsa_jax.demo.generate import params_as, sampling_inputs
    from fpsa_jax.training.calibration import Sample

    try:
        checkpoint = load_demo(request.demo_checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise _usage("demo_checkpoint", str(e)) from None
    samples = [Sample(*sampling_inputs([p], [s])) for p in request.prompts for s in request.seeds]
    condition = task.model_condition(checkpoint.config)
    return (
        checkpoint.config,
        params_as(checkpoint),
        samples,
        condition,
        _settings(request, checkpoint.sampling),
    )


def _wan_inputs(request: Request):
    from fpsa_jax import pipeline
    from fpsa_jax.convert import load_t2v_weights
    from fpsa_jax.training.calibration import Sample

    try:
        weights = load_t2v_weights(request.ckpt_dir)
    except (FileNotFoundError, ValueError) as e:
        raise _usage("ckpt_dir", str(e)) from None
    context = pipeline.encode_prompts(weights, list(request.prompts))
    negative = pipeline.encode_prompts(
        weights, [request.negative_prompt or pipeline.WAN_NEGATIVE_PROMPT]
    )
    frames, height, width = request.video
    shape = pipeline.latent_shape(1, width, height, frames, weights.dit_config.in_dim)
    samples = [
        Sample(pipeline.initial_noise(s, shape), context[i : i + 1], negative)
        for i in range(len(request.prompts))
        for s in request.seeds
    ]
    defaults = pipeline.T2VRequest(prompt="")
    return weights.dit_config, weights.dit_params, samples, None, _settings(request, defaults)
