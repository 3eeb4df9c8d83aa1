"""The embedded default of `python -m infer`: the demo model shipped in fpsa_jax/assets/demo.

A small pixel-space Wan DiT fine-tuned with the demo FPSA schedule (fpsa_jax.demo) generates 9
frames of 32x32 for a caption of the form "a <colour> <shape> moves <direction> <slowly|quickly>";
the analytic evaluator then reads the attributes back from the generated pixels. Writes the video
as an mp4 (upscaled 8x, nearest neighbour, so it can be seen) and a PNG strip of its frames.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fpsa_jax.attention import Impl
from fpsa_jax.data.synthetic import ADVERBS, DIRECTIONS, PALETTE, SHAPES

DEFAULT_PROMPT = "a magenta circle moves down slowly"
UPSCALE = 8
FPS = 8
SIZE = "32*32"
FRAMES = 9


def vocabulary() -> str:
    """One line describing the captions the demo model was trained on."""
    return (
        f"a <colour> <shape> moves <direction> <speed>: colours {', '.join(PALETTE)}; shapes "
        f"{', '.join(SHAPES)}; directions {', '.join(DIRECTIONS)}; speeds "
        f"{', '.join(ADVERBS.values())}"
    )


def upscale(video: np.ndarray, factor: int = UPSCALE) -> np.ndarray:
    """[F, H, W, 3] -> [F, factor H, factor W, 3] by pixel repetition."""
    return video.repeat(factor, axis=1).repeat(factor, axis=2)


def save_strip(path: Path, video: np.ndarray) -> None:
    """Writes the frames of `video` [F, H, W, 3] in [-1, 1] side by side as a PNG (atomically)."""
    from PIL import Image

    from infer.video import to_uint8

    frames = to_uint8(upscale(video, 4))
    gap = np.full((frames.shape[1], 4, 3), 255, np.uint8)
    parts = [p for f in frames for p in (f, gap)][:-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(np.concatenate(parts, axis=1)).save(tmp)
    tmp.replace(path)


def _tokens(config) -> int:
    pt, ph, pw = config.patch_size
    width, height = (int(x) for x in SIZE.split("*"))
    return (FRAMES // pt) * (height // ph) * (width // pw)


def run(
    *,
    prompt: str,
    seed: int,
    resolve_schedule: Callable[[object], tuple[object, str]],
    num_steps: int | None,
    shift: float | None,
    guide_scale: float | None,
    attention_impl: Impl,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, dict[str, float], object]:
    """Loads the embedded model and samples one video [F, H, W, 3] in [-1, 1].

    resolve_schedule(checkpoint) -> (StepSchedule | None, its name); None arguments take the
    checkpoint's sampling settings. Returns the video, timings and the evaluator's reading
    (fpsa_jax.demo.evaluate.VideoAttributes).
    """
    import dataclasses

    from fpsa_jax.demo import load_demo
    from fpsa_jax.demo.evaluate import read_attributes
    from fpsa_jax.demo.generate import generate

    timings = {}
    start = time.perf_counter()
    checkpoint = load_demo()
    if shift is not None:
        sampling = dataclasses.replace(checkpoint.sampling, shift=shift)
        checkpoint = dataclasses.replace(checkpoint, sampling=sampling)
    timings["loading weights"] = time.perf_counter() - start
    schedule, name = resolve_schedule(checkpoint)
    steps = checkpoint.sampling.num_steps if num_steps is None else num_steps
    cfg = checkpoint.config
    print(
        f"{cfg.num_params() / 1e6:,.2f}M-parameter demo DiT (pixel space, fpsa_jax/assets/demo), "
        f"{SIZE} x {FRAMES} frames = {_tokens(cfg)} tokens; {steps} "
        f"{checkpoint.sampling.solver} steps, attention {name}"
    )
    start = time.perf_counter()
    video = generate(
        checkpoint,
        [prompt],
        [seed],
        schedule=schedule,
        guide_scale=guide_scale,
        num_steps=num_steps,
        attention_impl=attention_impl,
        progress=progress,
    )[0]
    timings["denoising (incl. compilation)"] = time.perf_counter() - start
    return video, timings, read_attributes(video)
