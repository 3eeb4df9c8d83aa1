"""`python -m infer`: text to video with Wan2.1, dense or FPSA attention.

Flags follow Wan2.1's generate.py (--task, --ckpt_dir, --prompt, --size, --frame_num,
--sample_solver, --sample_steps, --sample_shift, --sample_guide_scale, --base_seed, --save_file),
plus --negative_prompt, --attention, --schedule, --save_latents, --attention_impl and
--linear_quant.

Without --ckpt_dir it runs the embedded demo model (fpsa_jax/assets/demo, see infer/demo.py): a
small pixel-space Wan DiT trained on captioned moving shapes and fine-tuned with FPSA, which
generates a 9-frame 32x32 video on a CPU in well under a minute.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

from absl import app, flags

from fpsa_jax import cli
from fpsa_jax.attention import IMPLS, StepSchedule
from fpsa_jax.config import LINEAR_QUANTS
from fpsa_jax.ranges import Range
from fpsa_jax.seeds import resolve_seed

_TASK = flags.DEFINE_enum(
    "task",
    "t2v-1.3B",
    ["t2v-1.3B", "t2v-14B"],
    "Wan2.1 task; picks defaults (size) when --ckpt_dir is given. The model's shape is read "
    "from the weights.",
)
_CKPT_DIR = flags.DEFINE_string(
    "ckpt_dir",
    None,
    "Wan2.1 text-to-video model directory, original layout (config.json, diffusion_pytorch_model"
    "*.safetensors, Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/) or "
    "diffusers layout (transformer/, vae/, text_encoder/, tokenizer/). Without it the embedded "
    "demo model runs (9 frames of 32*32, captions like 'a red square moves left quickly').",
)
_PROMPT = flags.DEFINE_string(
    "prompt",
    None,
    "Text prompt of the video (not empty). Default: 'A red square slides from left to right "
    "across a dark background.' (Wan), 'a magenta circle moves down slowly' (the embedded demo "
    "model).",
)
_WAN_PROMPT = "A red square slides from left to right across a dark background."
_NEGATIVE_PROMPT = flags.DEFINE_string(
    "negative_prompt", "", "Negative prompt for classifier-free guidance; empty = Wan's default."
)
_SIZE = flags.DEFINE_string(
    "size",
    None,
    "Video size WIDTH*HEIGHT in pixels, multiples of 16 (e.g. 832*480, 1280*720). Default: "
    "832*480 for t2v-1.3B, 1280*720 for t2v-14B, 32*32 (the only size) for the embedded demo.",
)
_FRAME_NUM = flags.DEFINE_integer(
    "frame_num", None, "Frames to generate, 4k+1. Default: 81 (9, the only count, for the demo)."
)
_SAMPLE_SOLVER = flags.DEFINE_enum("sample_solver", "unipc", ["unipc", "euler"], "Sampler.")
_SAMPLE_STEPS = cli.check_range(
    flags.DEFINE_integer(
        "sample_steps",
        None,
        "Denoising steps (>= 1). Default: 50 (the demo model's own, 20, without --ckpt_dir).",
    ),
    Range(1, integer=True),
)
_SAMPLE_SHIFT = cli.check_range(
    flags.DEFINE_float(
        "sample_shift",
        None,
        "Noise schedule shift (> 0; Wan suggests 8-12 for 1.3B at 480p). Default: 5.0 (the demo "
        "model's own without --ckpt_dir).",
    ),
    Range(0, lo_open=True),
)
_GUIDE_SCALE = cli.check_range(
    flags.DEFINE_float(
        "sample_guide_scale",
        None,
        "Classifier-free guidance scale (finite, >= 0; 1 = no guidance). Default: 5.0 (the demo "
        "model's own without --ckpt_dir).",
    ),
    Range(0),
)
_BASE_SEED = cli.check_range(
    flags.DEFINE_integer(
        "base_seed",
        0,
        "Seed of the initial noise, < 2^63; negative: a random seed, printed (as in Wan's "
        "generate.py).",
    ),
    Range(hi=2**63, hi_open=True, integer=True),
    " (a negative seed picks a random one)",
)
_SAVE_FILE = flags.DEFINE_string(
    "save_file",
    None,
    "Output .mp4 path. Default: outputs/<task>_<size>_<seed>_<prompt>_<hash>.mp4, the prompt's "
    "ASCII letters and digits (50 at most) and a hash of the whole prompt, so different prompts "
    "never share a name.",
)
_SAVE_LATENTS = flags.DEFINE_string(
    "save_latents", None, "Also write the denoised latents [B, f, h, w, 16] to this .npy file."
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace outputs (--save_file, its .png strip for the demo, --save_latents) that already "
    "exist; without it the run refuses them before it starts.",
)
_ATTENTION = flags.DEFINE_enum(
    "attention",
    None,
    ["dense", "fpsa"],
    "Self-attention: dense, or FPSA (FP8 + sparse tiles) switched per step by --schedule. "
    "Default: dense with --ckpt_dir, fpsa (the schedule it was fine-tuned with) for the demo.",
)
_SCHEDULE = flags.DEFINE_string(
    "schedule",
    None,
    "FPSA step schedule: a preset (wan-480p, wan-720p, dense) or a JSON file written by "
    "StepSchedule.to_json. Default: the preset of the video's resolution (with --ckpt_dir), "
    "the schedule the model was fine-tuned with (demo).",
)
_ULYSSES_SIZE = cli.check_range(
    flags.DEFINE_integer(
        "ulysses_size",
        1,
        "Sequence-parallel degree (as in Wan's generate.py): self-attention is split over this "
        "many devices by heads (Ulysses all-to-all); the heads and tokens must divide by it.",
    ),
    Range(1, integer=True),
)
_ATTENTION_IMPL = flags.DEFINE_enum(
    "attention_impl",
    "auto",
    IMPLS,
    "Implementation of the self-attention operator (fpsa_jax.attention.fpsa_attention); auto "
    "picks the fastest that runs the inputs here.",
)
_LINEAR_QUANT = flags.DEFINE_enum(
    "linear_quant",
    "none",
    LINEAR_QUANTS,
    "fp8: the DiT's block linears as E4M3 x E4M3 GEMMs with float32 accumulation, weights "
    "quantized at load (per output channel), activations per token. Needs a GPU with FP8 "
    "tensor cores (compute capability >= 8.9).",
)

_FPS = 16  # Wan2.1's sample_fps


@dataclasses.dataclass(frozen=True)
class _Request:
    """What the flags ask for, every one checked (no weights touched yet). None fields take the
    embedded demo model's own settings; `seed` is --base_seed, drawn at random when negative;
    `schedule` is --schedule, parsed (None: not given); `linear_quant` is --linear_quant,
    checked against this backend."""

    prompt: str
    seed: int
    size: str
    width: int
    height: int
    frames: int
    steps: int | None
    shift: float | None
    guide_scale: float | None
    dense: bool
    schedule: tuple[StepSchedule, str] | None
    save_file: Path
    save_latents: Path | None
    linear_quant: str


def _parse_size(size: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[*x]\s*(\d+)\s*", size)
    if not match:
        raise app.UsageError(f"--size must look like 832*480 (WIDTH*HEIGHT), got {size!r}")
    return int(match.group(1)), int(match.group(2))


def _schedule_flag(dense: bool) -> tuple[StepSchedule, str] | None:
    if not _SCHEDULE.value:
        return None
    if dense:
        raise app.UsageError("--schedule needs --attention=fpsa")
    try:
        return StepSchedule.load(_SCHEDULE.value), _SCHEDULE.value
    except (OSError, ValueError) as e:
        raise app.UsageError(f"--schedule {_SCHEDULE.value}: {e}") from None


def _linear_quant_flag() -> str:
    if _LINEAR_QUANT.value == "fp8":
        from fpsa_jax.model.fp8_linear import check_backend

        try:
            check_backend("cublaslt")
        except ValueError as e:
            raise app.UsageError(f"--linear_quant fp8: {e}") from None
    return _LINEAR_QUANT.value


def _request(embedded: bool) -> _Request:
    from fpsa_jax.pipeline import check_video_request
    from infer import demo, video

    wan_size = "832*480" if _TASK.value == "t2v-1.3B" else "1280*720"
    size = _SIZE.value or (demo.SIZE if embedded else wan_size)
    width, height = _parse_size(size)
    frames = _FRAME_NUM.value if _FRAME_NUM.value is not None else (demo.FRAMES if embedded else 81)
    steps = _SAMPLE_STEPS.value if _SAMPLE_STEPS.value is not None else (None if embedded else 50)
    guide_scale = (
        _GUIDE_SCALE.value if _GUIDE_SCALE.value is not None else (None if embedded else 5.0)
    )
    shift = _SAMPLE_SHIFT.value if _SAMPLE_SHIFT.value is not None else (None if embedded else 5.0)
    prompt = _PROMPT.value
    if prompt is not None and not prompt.strip():
        raise app.UsageError(
            "--prompt is empty; give the video's text, or leave --prompt out for the default"
        )
    prompt = prompt or (demo.DEFAULT_PROMPT if embedded else _WAN_PROMPT)
    seed = resolve_seed(_BASE_SEED.value)
    try:
        check_video_request(width, height, frames)
    except ValueError as e:
        raise app.UsageError(f"--size={size} --frame_num={frames}: {e}") from None
    if embedded and (size.replace(" ", "").replace("x", "*") != demo.SIZE or frames != demo.FRAMES):
        raise app.UsageError(
            f"the embedded demo model generates {demo.FRAMES} frames of {demo.SIZE} only, got "
            f"--size={size} --frame_num={frames}; pass --ckpt_dir for Wan2.1"
        )
    dense = (_ATTENTION.value or ("fpsa" if embedded else "dense")) == "dense"
    schedule = _schedule_flag(dense)
    task = _TASK.value if not embedded else "default"
    save_file = Path(_SAVE_FILE.value or video.default_save_file(task, size, seed, prompt))
    if save_file.suffix.lower() != ".mp4":
        raise app.UsageError(f"--save_file must end in .mp4, got {save_file}")
    if _SAVE_LATENTS.value and not _SAVE_LATENTS.value.endswith(".npy"):
        raise app.UsageError(f"--save_latents must end in .npy, got {_SAVE_LATENTS.value}")
    save_latents = Path(_SAVE_LATENTS.value) if _SAVE_LATENTS.value else None
    return _Request(
        prompt=prompt,
        seed=seed,
        size=size,
        width=width,
        height=height,
        frames=frames,
        steps=steps,
        shift=shift,
        guide_scale=guide_scale,
        dense=dense,
        schedule=schedule,
        save_file=save_file,
        save_latents=save_latents,
        linear_quant=_linear_quant_flag(),
    )


def _schedule(request: _Request, default: StepSchedule | None, default_name: str):
    """(StepSchedule | None, its name) of the run: dense, --schedule, or the model's default."""
    if request.dense:
        return None, "dense"
    return request.schedule or (default, default_name)


def _mesh():
    """The --ulysses_size mesh (checked by `_check_before_loading`), None for one device."""
    import jax

    from fpsa_jax.parallel import make_mesh

    n = _ULYSSES_SIZE.value
    return make_mesh(seq=n, devices=jax.devices()[:n]) if n > 1 else None


def _check_ulysses(request: _Request, embedded: bool, files) -> None:
    """--ulysses_size against the devices, and the DiT's heads and the video's tokens (the
    DiT's config read from its headers: no weight loads)."""
    import jax

    from fpsa_jax.convert.checkpoint import read_wan_config
    from fpsa_jax.parallel import check_mesh_shape
    from fpsa_jax.pipeline import latent_shape

    n = _ULYSSES_SIZE.value
    if embedded and n > 1:
        raise app.UsageError("--ulysses_size > 1 needs --ckpt_dir (the demo model is one device)")
    if n == 1:
        check_mesh_shape((1, 1, n), devices=jax.device_count())
        return
    cfg = read_wan_config(files.dit)
    _, f, h, w, _ = latent_shape(1, request.width, request.height, request.frames)
    pt, ph, pw = cfg.patch_size
    try:
        check_mesh_shape(
            (1, 1, n),
            devices=jax.device_count(),
            heads=cfg.num_heads,
            tokens=(f // pt) * (h // ph) * (w // pw),
        )
    except ValueError as e:
        raise app.UsageError(f"--ulysses_size {n}: {e}") from None


def _progress_bar(total: int):
    """(tqdm bar, hook for `progress`): the hook sets the bar to (done, total) steps."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc="denoising", unit="step")

    def progress(done: int, steps: int) -> None:
        bar.total, bar.n = steps, done
        bar.refresh()

    return bar, progress


def _loading_bar():
    """(tqdm bar over the 4 parts of a model directory, hook for load_t2v_weights' progress;
    progress(None) marks the last part done)."""
    from tqdm import tqdm

    bar = tqdm(total=4, desc="loading weights", unit="part")

    def progress(part: str | None) -> None:
        if bar.postfix:  # the part before this one is done
            bar.update(1)
        bar.set_postfix_str(part or "done")

    return bar, progress


def _generate_demo(request: _Request) -> None:
    """The embedded demo model (fpsa_jax.demo): one `generate` call, then the files."""
    from fpsa_jax.demo import load_demo
    from fpsa_jax.demo.evaluate import read_attributes
    from fpsa_jax.demo.generate import generate, with_linear_quant
    from infer import demo
    from infer.video import save_npy, save_video

    print(f"No --ckpt_dir: the embedded demo model, trained on captions {demo.vocabulary()}.")
    start = time.perf_counter()
    checkpoint = with_linear_quant(load_demo(), request.linear_quant)
    timings = {"loading weights": time.perf_counter() - start}
    schedule, name = _schedule(request, checkpoint.schedule, "demo (as fine-tuned)")
    steps = request.steps or checkpoint.sampling.num_steps
    print(demo.describe(checkpoint.config, steps, checkpoint.sampling.solver, name))
    start = time.perf_counter()
    bar, progress = _progress_bar(steps)
    with bar:
        video = generate(
            checkpoint,
            [request.prompt],
            [request.seed],
            schedule=schedule,
            guide_scale=request.guide_scale,
            num_steps=request.steps,
            shift=request.shift,
            attention_impl=_ATTENTION_IMPL.value,
            progress=progress,
        )[0]
    timings["denoising (incl. compilation)"] = time.perf_counter() - start
    save_video(request.save_file, demo.upscale(video), fps=demo.FPS)
    strip = request.save_file.with_suffix(".png")
    demo.save_strip(strip, video)
    if request.save_latents:
        save_npy(request.save_latents, video[None])
    print("time per phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    reading = read_attributes(video)
    print(
        "the analytic evaluator reads the video as: "
        + " ".join(f"{k}={v}" for k, v in reading.as_dict().items())
    )
    print(
        f"wrote {video.shape[0]} frames at {demo.FPS} fps ({demo.SIZE} upscaled "
        f"{demo.UPSCALE}x) to {request.save_file.resolve()}"
    )
    print(f"wrote the frames as a strip to {strip.resolve()}")
    if request.save_latents:
        print(f"wrote the video array to {request.save_latents.resolve()}")


def _generate_wan(request: _Request, mesh) -> None:
    """Wan2.1 weights from --ckpt_dir: one `text_to_video` call, then the files."""
    import numpy as np

    from fpsa_jax import pipeline
    from fpsa_jax.convert import load_t2v_weights, with_fp8_linears
    from infer.video import save_npy, save_video

    preset = "wan-480p" if request.height * request.width <= 480 * 832 else "wan-720p"
    schedule, name = _schedule(request, StepSchedule.preset(preset), preset)
    t2v = pipeline.T2VRequest(
        prompt=request.prompt,
        width=request.width,
        height=request.height,
        frames=request.frames,
        seed=request.seed,
        negative_prompt=_NEGATIVE_PROMPT.value or pipeline.WAN_NEGATIVE_PROMPT,
        num_steps=request.steps,
        shift=request.shift,
        guide_scale=request.guide_scale,
        solver=_SAMPLE_SOLVER.value,
        schedule=schedule,
        linear_quant=request.linear_quant,
    )
    start = time.perf_counter()
    bar, progress = _loading_bar()
    try:
        with bar:
            weights = load_t2v_weights(_CKPT_DIR.value, progress=progress)
            progress(None)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(f"--ckpt_dir {_CKPT_DIR.value}: {e}") from None
    if t2v.linear_quant == "fp8":
        # Quantized at load (and timed with it), so the float block linears are freed here;
        # text_to_video takes FP8 weights as they are.
        weights = with_fp8_linears(weights)
    loading = time.perf_counter() - start

    cfg = weights.dit_config
    shape = pipeline.latent_shape(1, t2v.width, t2v.height, t2v.frames, cfg.in_dim)
    tokens = shape[1] * (shape[2] // 2) * (shape[3] // 2)
    print(
        f"{cfg.num_params() / 1e6:,.1f}M-parameter DiT, {request.size} x {t2v.frames} frames -> "
        f"latents {shape[1:]} = {tokens:,} tokens; {t2v.num_steps} {t2v.solver} steps, "
        f"attention {name}"
    )
    bar, progress = _progress_bar(t2v.num_steps)
    with bar:
        result = pipeline.text_to_video(
            weights, t2v, attention_impl=_ATTENTION_IMPL.value, progress=progress, mesh=mesh
        )
    save_video(request.save_file, np.asarray(result.video[0]), fps=_FPS)
    if request.save_latents:
        save_npy(request.save_latents, np.asarray(result.latents))
    timings = {"loading weights": loading, **result.timings}
    print("time per phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    print(f"wrote {result.video.shape[1]} frames at {_FPS} fps to {request.save_file.resolve()}")
    if request.save_latents:
        print(f"wrote latents {tuple(result.latents.shape)} to {request.save_latents.resolve()}")


def _check_before_loading(request: _Request, embedded: bool) -> None:
    """Everything the run needs that can be checked before weights load: every output location
    (writable, room for the latents, not there already unless --overwrite), with --ckpt_dir the
    model directory's files and the packages that reading them needs, and --ulysses_size."""
    import math

    from fpsa_jax.convert import check_t2v_directory
    from fpsa_jax.outputs import Output, OutputError, check_outputs
    from fpsa_jax.pipeline import latent_shape

    replace = _OVERWRITE.value
    outputs = [Output("--save_file", request.save_file, replace=replace)]
    if embedded:  # the PNG strip of the frames beside the video
        strip = request.save_file.with_suffix(".png")
        outputs.append(Output("--save_file", strip, replace=replace))
    if request.save_latents:
        shape = (
            (1, request.frames, request.height, request.width, 3)  # the demo's pixels
            if embedded
            else latent_shape(1, request.width, request.height, request.frames)
        )
        size = 4 * math.prod(shape) + 128  # float32 and the .npy header
        outputs.append(Output("--save_latents", request.save_latents, size=size, replace=replace))
    try:
        check_outputs(outputs)
        files = None if embedded else check_t2v_directory(_CKPT_DIR.value)
        _check_ulysses(request, embedded, files)
    except (OutputError, ImportError) as e:
        where = "" if isinstance(e, OutputError) else f"--ckpt_dir {_CKPT_DIR.value}: "
        raise SystemExit(f"error: {where}{e}") from None
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(f"--ckpt_dir {_CKPT_DIR.value}: {e}") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from fpsa_jax.outputs import stop_on_signals

    embedded = not _CKPT_DIR.value
    request = _request(embedded)
    _check_before_loading(request, embedded)
    if request.seed != _BASE_SEED.value:
        print(
            f"--base_seed {_BASE_SEED.value}: the random seed {request.seed} "
            f"(--base_seed={request.seed} makes this video again)"
        )
    mesh = _mesh()
    with stop_on_signals():  # SIGTERM removes half-written outputs as Ctrl-C does
        if embedded:
            _generate_demo(request)
        else:
            _generate_wan(request, mesh)


if __name__ == "__main__":
    cli.run(main)
