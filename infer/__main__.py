"""`python -m infer`: text to video with Wan2.1, dense or FPSA attention.

Flags follow Wan2.1's generate.py (--task, --ckpt_dir, --prompt, --size, --frame_num,
--sample_solver, --sample_steps, --sample_shift, --sample_guide_scale, --base_seed, --save_file),
plus --negative_prompt, --attention, --schedule, --save_latents and --attention_impl.

Without --ckpt_dir it runs the embedded demo model (fpsa_jax/assets/demo, see infer/demo.py): a
small pixel-space Wan DiT trained on captioned moving shapes and fine-tuned with FPSA, which
generates a 9-frame 32x32 video on a CPU in well under a minute.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from absl import app, flags

from fpsa_jax.attention import IMPLS

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
    "Text prompt of the video. Default: 'A red square slides from left to right across a dark "
    "background.' (Wan), 'a magenta circle moves down slowly' (the embedded demo model).",
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
_SAMPLE_STEPS = flags.DEFINE_integer(
    "sample_steps",
    None,
    "Denoising steps. Default: 50 (the demo model's own, 20, without --ckpt_dir).",
)
_SAMPLE_SHIFT = flags.DEFINE_float(
    "sample_shift",
    None,
    "Noise schedule shift (Wan suggests 8-12 for 1.3B at 480p). Default: 5.0 (the demo "
    "model's own without --ckpt_dir).",
)
_GUIDE_SCALE = flags.DEFINE_float(
    "sample_guide_scale",
    None,
    "Classifier-free guidance scale (>= 0; 1 = no guidance). Default: 5.0 (the demo model's "
    "own without --ckpt_dir).",
)
_BASE_SEED = flags.DEFINE_integer("base_seed", 0, "Seed of the initial noise.")
_SAVE_FILE = flags.DEFINE_string(
    "save_file", None, "Output .mp4 path. Default: outputs/<task>_<size>_<seed>_<prompt>.mp4."
)
_SAVE_LATENTS = flags.DEFINE_string(
    "save_latents", None, "Also write the denoised latents [B, f, h, w, 16] to this .npy file."
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
_ULYSSES_SIZE = flags.DEFINE_integer(
    "ulysses_size",
    1,
    "Sequence-parallel degree (as in Wan's generate.py): self-attention is split over this many "
    "devices by heads (Ulysses all-to-all); the heads and tokens must divide by it.",
)
_ATTENTION_IMPL = flags.DEFINE_enum(
    "attention_impl",
    "auto",
    IMPLS,
    "Implementation of the self-attention operator (fpsa_jax.attention.fpsa_attention); auto "
    "picks the fastest that runs the inputs here.",
)

_FPS = 16  # Wan2.1's sample_fps


def _parse_size(size: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[*x]\s*(\d+)\s*", size)
    if not match:
        raise app.UsageError(f"--size must look like 832*480 (WIDTH*HEIGHT), got {size!r}")
    return int(match.group(1)), int(match.group(2))


def _attention_mode() -> str:
    return _ATTENTION.value or ("dense" if _CKPT_DIR.value else "fpsa")


def _resolve_schedule(height: int, width: int, trained=None):
    """(StepSchedule | None, name); `trained` is the embedded model's own schedule."""
    from fpsa_jax.attention import StepSchedule

    if _attention_mode() == "dense":
        if _SCHEDULE.value:
            raise app.UsageError("--schedule needs --attention=fpsa")
        return None, "dense"
    if trained is not None and not _SCHEDULE.value:
        return trained, "demo (as fine-tuned)"
    name = _SCHEDULE.value or ("wan-480p" if height * width <= 480 * 832 else "wan-720p")
    try:
        return StepSchedule.load(name), name
    except (OSError, ValueError) as e:
        raise app.UsageError(f"--schedule {name}: {e}") from None


def _default_save_file(size: str, seed: int, prompt: str) -> Path:
    task = _TASK.value if _CKPT_DIR.value else "default"
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt)[:50].strip("_") or "video"
    return Path("outputs") / f"{task}_{size.replace('*', 'x')}_{seed}_{slug}.mp4"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from infer import demo

    embedded = not _CKPT_DIR.value
    default_size = (
        demo.SIZE if embedded else ("832*480" if _TASK.value == "t2v-1.3B" else "1280*720")
    )
    size = _SIZE.value or default_size
    width, height = _parse_size(size)
    frames = _FRAME_NUM.value if _FRAME_NUM.value is not None else (demo.FRAMES if embedded else 81)
    steps = _SAMPLE_STEPS.value if _SAMPLE_STEPS.value is not None else (None if embedded else 50)
    if steps is not None and steps < 1:
        raise app.UsageError(f"--sample_steps must be >= 1, got {steps}")
    guide_scale = (
        _GUIDE_SCALE.value if _GUIDE_SCALE.value is not None else (None if embedded else 5.0)
    )
    if guide_scale is not None and not guide_scale >= 0:
        raise app.UsageError(f"--sample_guide_scale must be >= 0, got {guide_scale}")
    prompt = _PROMPT.value or (demo.DEFAULT_PROMPT if embedded else _WAN_PROMPT)

    from fpsa_jax import pipeline
    from fpsa_jax.convert import load_t2v_weights

    try:
        pipeline.check_video_request(width, height, frames)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if embedded and (size.replace(" ", "").replace("x", "*") != demo.SIZE or frames != demo.FRAMES):
        raise app.UsageError(
            f"the embedded demo model generates {demo.FRAMES} frames of {demo.SIZE} only, got "
            f"--size={size} --frame_num={frames}; pass --ckpt_dir for Wan2.1"
        )
    schedule, schedule_name = _resolve_schedule(height, width)  # validates the flags early
    save_file = Path(_SAVE_FILE.value or _default_save_file(size, _BASE_SEED.value, prompt))
    if save_file.suffix.lower() != ".mp4":
        raise app.UsageError(f"--save_file must end in .mp4, got {save_file}")
    if _SAVE_LATENTS.value and not _SAVE_LATENTS.value.endswith(".npy"):
        raise app.UsageError(f"--save_latents must end in .npy, got {_SAVE_LATENTS.value}")

    import jax
    import numpy as np
    from tqdm import tqdm

    from fpsa_jax.parallel import make_mesh

    if not 1 <= _ULYSSES_SIZE.value <= jax.device_count():
        raise app.UsageError(
            f"--ulysses_size must be in [1, {jax.device_count()}] (devices), got "
            f"{_ULYSSES_SIZE.value}"
        )
    if embedded and _ULYSSES_SIZE.value > 1:
        raise app.UsageError("--ulysses_size > 1 needs --ckpt_dir (the demo model is one device)")
    mesh = None
    if _ULYSSES_SIZE.value > 1:
        mesh = make_mesh(seq=_ULYSSES_SIZE.value, devices=jax.devices()[: _ULYSSES_SIZE.value])

    from infer.video import save_npy, save_video

    if embedded:
        print(f"No --ckpt_dir: the embedded demo model, trained on captions {demo.vocabulary()}.")
        with tqdm(total=steps or 1, desc="denoising", unit="step") as bar:

            def progress(done: int, total: int) -> None:
                bar.total, bar.n = total, done
                bar.refresh()

            video, timings, reading = demo.run(
                prompt=prompt,
                seed=_BASE_SEED.value,
                resolve_schedule=lambda ckpt: _resolve_schedule(height, width, ckpt.schedule),
                num_steps=steps,
                shift=_SAMPLE_SHIFT.value,
                guide_scale=guide_scale,
                attention_impl=_ATTENTION_IMPL.value,
                progress=progress,
            )
        save_video(save_file, demo.upscale(video), fps=demo.FPS)
        strip = save_file.with_suffix(".png")
        demo.save_strip(strip, video)
        if _SAVE_LATENTS.value:
            save_npy(Path(_SAVE_LATENTS.value), video[None])
        print("time per phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
        print(
            "the analytic evaluator reads the video as: "
            + " ".join(f"{k}={v}" for k, v in reading.as_dict().items())
        )
        print(
            f"wrote {video.shape[0]} frames at {demo.FPS} fps ({demo.SIZE} upscaled "
            f"{demo.UPSCALE}x) to {save_file.resolve()}"
        )
        print(f"wrote the frames as a strip to {strip.resolve()}")
        if _SAVE_LATENTS.value:
            print(f"wrote the video array to {Path(_SAVE_LATENTS.value).resolve()}")
        return

    timings: dict[str, float] = {}
    start = time.perf_counter()
    try:
        weights = load_t2v_weights(_CKPT_DIR.value)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(f"--ckpt_dir {_CKPT_DIR.value}: {e}") from None
    timings["loading weights"] = time.perf_counter() - start

    start = time.perf_counter()
    negative = _NEGATIVE_PROMPT.value or pipeline.WAN_NEGATIVE_PROMPT
    cfg = weights.dit_config
    context = pipeline.encode_prompts(weights, [prompt])
    negative_context = pipeline.encode_prompts(weights, [negative])
    jax.block_until_ready((context, negative_context))
    timings["text encoding"] = time.perf_counter() - start

    shape = pipeline.latent_shape(1, width, height, frames, cfg.in_dim)
    noise = pipeline.initial_noise(_BASE_SEED.value, shape)
    tokens = shape[1] * (shape[2] // 2) * (shape[3] // 2)
    print(
        f"{cfg.num_params() / 1e6:,.1f}M-parameter DiT, {size} x {frames} frames -> latents "
        f"{shape[1:]} = {tokens:,} tokens; {steps} {_SAMPLE_SOLVER.value} steps, attention "
        f"{schedule_name}"
    )
    start = time.perf_counter()
    with tqdm(total=steps, desc="denoising", unit="step") as bar:

        def progress(done: int, total: int) -> None:
            bar.n = done
            bar.refresh()

        latents = pipeline.denoise(
            weights,
            noise,
            context,
            negative_context,
            num_steps=steps,
            shift=5.0 if _SAMPLE_SHIFT.value is None else _SAMPLE_SHIFT.value,
            guide_scale=guide_scale,
            solver=_SAMPLE_SOLVER.value,
            schedule=schedule,
            attention_impl=_ATTENTION_IMPL.value,
            progress=progress,
            mesh=mesh,
        )
    timings["denoising (incl. compilation)"] = time.perf_counter() - start

    start = time.perf_counter()
    video = jax.block_until_ready(pipeline.decode_latents(weights, latents))
    timings["decoding"] = time.perf_counter() - start

    save_video(save_file, np.asarray(video[0]), fps=_FPS)
    if _SAVE_LATENTS.value:
        save_npy(Path(_SAVE_LATENTS.value), np.asarray(latents))
    print("time per phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    print(f"wrote {video.shape[1]} frames at {_FPS} fps to {save_file.resolve()}")
    if _SAVE_LATENTS.value:
        print(f"wrote latents {tuple(latents.shape)} to {Path(_SAVE_LATENTS.value).resolve()}")


if __name__ == "__main__":
    app.run(main)
