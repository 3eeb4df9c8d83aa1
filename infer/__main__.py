"""`python -m infer`: text to video with Wan2.1, dense or FPSA attention.

Flags follow Wan2.1's generate.py (--task, --ckpt_dir, --prompt, --size, --frame_num,
--sample_solver, --sample_steps, --sample_shift, --sample_guide_scale, --base_seed, --save_file),
plus --negative_prompt, --attention, --schedule, --save_latents and --attention_impl.

Without --ckpt_dir it runs the embedded default model so the whole path can be tried anywhere.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from absl import app, flags, logging

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
    "default model runs.",
)
_PROMPT = flags.DEFINE_string(
    "prompt",
    "A red square slides from left to right across a dark background.",
    "Text prompt of the video.",
)
_NEGATIVE_PROMPT = flags.DEFINE_string(
    "negative_prompt", "", "Negative prompt for classifier-free guidance; empty = Wan's default."
)
_SIZE = flags.DEFINE_string(
    "size",
    None,
    "Video size WIDTH*HEIGHT in pixels, multiples of 16 (e.g. 832*480, 1280*720). Default: "
    "832*480 for t2v-1.3B, 1280*720 for t2v-14B, 128*128 for the embedded default.",
)
_FRAME_NUM = flags.DEFINE_integer(
    "frame_num", None, "Frames to generate, 4k+1. Default: 81 (17 for the embedded default)."
)
_SAMPLE_SOLVER = flags.DEFINE_enum("sample_solver", "unipc", ["unipc", "euler"], "Sampler.")
_SAMPLE_STEPS = flags.DEFINE_integer(
    "sample_steps", None, "Denoising steps. Default: 50 (20 for the embedded default)."
)
_SAMPLE_SHIFT = flags.DEFINE_float(
    "sample_shift", 5.0, "Noise schedule shift (Wan suggests 8-12 for 1.3B at 480p)."
)
_GUIDE_SCALE = flags.DEFINE_float(
    "sample_guide_scale", 5.0, "Classifier-free guidance scale (>= 0; 1 = no guidance)."
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
    "dense",
    ["dense", "fpsa"],
    "Self-attention: dense, or FPSA (FP8 + sparse tiles) switched per step by --schedule.",
)
_SCHEDULE = flags.DEFINE_string(
    "schedule",
    None,
    "FPSA step schedule: a preset (wan-480p, wan-720p, dense) or a JSON file written by "
    "StepSchedule.to_json. Default: the preset of the video's resolution.",
)
_ULYSSES_SIZE = flags.DEFINE_integer(
    "ulysses_size",
    1,
    "Sequence-parallel degree (as in Wan's generate.py): self-attention is split over this many "
    "devices by heads (Ulysses all-to-all); the heads and tokens must divide by it.",
)
_ATTENTION_IMPL = flags.DEFINE_string(
    "attention_impl",
    "auto",
    "Implementation of the attention operator: auto, xla, reference, cudnn, cudnn_fp8.",
)

_FPS = 16  # Wan2.1's sample_fps


def _parse_size(size: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[*x]\s*(\d+)\s*", size)
    if not match:
        raise app.UsageError(f"--size must look like 832*480 (WIDTH*HEIGHT), got {size!r}")
    return int(match.group(1)), int(match.group(2))


def _resolve_schedule(height: int, width: int):
    from fpsa_jax.attention import StepSchedule

    if _ATTENTION.value == "dense":
        if _SCHEDULE.value:
            raise app.UsageError("--schedule needs --attention=fpsa")
        return None, "dense"
    name = _SCHEDULE.value or ("wan-480p" if height * width <= 480 * 832 else "wan-720p")
    try:
        if name.endswith(".json"):
            if not Path(name).is_file():
                raise app.UsageError(f"--schedule file not found: {name}")
            return StepSchedule.from_json(Path(name).read_text()), name
        return StepSchedule.preset(name), name
    except ValueError as e:
        raise app.UsageError(f"--schedule {name}: {e}") from None


def _default_weights(seed: int):
    """The embedded default: the tiny DiT and tiny VAE with random weights (placeholder until the
    trained demo model ships) and no text encoder."""
    import functools

    import jax

    from fpsa_jax.config import WanConfig
    from fpsa_jax.model import vae as wan_vae
    from fpsa_jax.model import wan
    from fpsa_jax.model.random_weights import random_weights
    from fpsa_jax.pipeline import T2VWeights

    dit_config = WanConfig.preset("tiny")
    vae_config = wan_vae.WanVAEConfig.preset("tiny")
    k1, k2 = jax.random.split(jax.random.key(seed))
    dit = random_weights(functools.partial(wan.init_params, dit_config), k1)
    vae = random_weights(functools.partial(wan_vae.init_params, vae_config), k2, std=0.2)
    return T2VWeights(dit_config, dit, vae_config, vae)


def _pseudo_embeddings(prompt: str, text_len: int, text_dim: int):
    """Stand-in text embeddings for a model without a text encoder: deterministic in the prompt."""
    import zlib

    import jax

    key = jax.random.key(zlib.crc32(prompt.encode("utf-8")))
    return jax.random.normal(key, (1, min(text_len, 16), text_dim))


def _default_save_file(size: str, seed: int, prompt: str) -> Path:
    task = _TASK.value if _CKPT_DIR.value else "default"
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt)[:50].strip("_") or "video"
    return Path("outputs") / f"{task}_{size.replace('*', 'x')}_{seed}_{slug}.mp4"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    embedded = not _CKPT_DIR.value
    default_size = (
        "128*128" if embedded else ("832*480" if _TASK.value == "t2v-1.3B" else "1280*720")
    )
    size = _SIZE.value or default_size
    width, height = _parse_size(size)
    frames = _FRAME_NUM.value if _FRAME_NUM.value is not None else (17 if embedded else 81)
    steps = _SAMPLE_STEPS.value if _SAMPLE_STEPS.value is not None else (20 if embedded else 50)
    if steps < 1:
        raise app.UsageError(f"--sample_steps must be >= 1, got {steps}")
    if not _GUIDE_SCALE.value >= 0:
        raise app.UsageError(f"--sample_guide_scale must be >= 0, got {_GUIDE_SCALE.value}")

    from fpsa_jax import pipeline

    try:
        pipeline.check_video_request(width, height, frames)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    schedule, schedule_name = _resolve_schedule(height, width)
    save_file = Path(_SAVE_FILE.value or _default_save_file(size, _BASE_SEED.value, _PROMPT.value))
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
    mesh = None
    if _ULYSSES_SIZE.value > 1:
        mesh = make_mesh(seq=_ULYSSES_SIZE.value, devices=jax.devices()[: _ULYSSES_SIZE.value])

    from infer.video import save_npy, save_video

    timings: dict[str, float] = {}
    start = time.perf_counter()
    if embedded:
        logging.warning(
            "No --ckpt_dir: running the embedded default, a tiny Wan-architecture model with "
            "RANDOM weights and no text encoder (the prompt seeds stand-in embeddings). Expect "
            "noise, not a picture; pass --ckpt_dir for real Wan2.1 weights."
        )
        weights = _default_weights(_BASE_SEED.value)
    else:
        try:
            weights = pipeline.load_t2v_weights(_CKPT_DIR.value)
        except (FileNotFoundError, ValueError) as e:
            raise app.UsageError(f"--ckpt_dir {_CKPT_DIR.value}: {e}") from None
    timings["loading weights"] = time.perf_counter() - start

    start = time.perf_counter()
    negative = _NEGATIVE_PROMPT.value or pipeline.WAN_NEGATIVE_PROMPT
    cfg = weights.dit_config
    if weights.tokenizer is None:
        context = _pseudo_embeddings(_PROMPT.value, cfg.text_len, cfg.text_dim)
        negative_context = _pseudo_embeddings(negative, cfg.text_len, cfg.text_dim)
    else:
        context = pipeline.encode_prompts(weights, [_PROMPT.value])
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
            shift=_SAMPLE_SHIFT.value,
            guide_scale=_GUIDE_SCALE.value,
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
