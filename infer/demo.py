"""The embedded default of `python -m infer`: the demo model shipped in fpsa_jax/assets/demo (what
the app prints and writes around `fpsa_jax.demo.generate`).

A small pixel-space Wan DiT fine-tuned with the demo FPSA schedule (fpsa_jax.demo) generates 9
frames of 32x32 for a caption of the form "a <colour> <shape> moves <direction> <slowly|quickly>";
the analytic evaluator then reads the attributes back from the generated pixels. Writes the video
as an mp4 (upscaled 8x, nearest neighbour, so it can be seen) and a PNG strip of its frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

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

    from fpsa_jax.outputs import atomic_file
    from infer.video import to_uint8

    frames = to_uint8(upscale(video, 4))
    gap = np.full((frames.shape[1], 4, 3), 255, np.uint8)
    parts = [p for f in frames for p in (f, gap)][:-1]
    with atomic_file(path) as tmp:
        Image.fromarray(np.concatenate(parts, axis=1)).save(tmp)


def describe(config, steps: int, solver: str, attention: str) -> str:
    """One line on the model and the run: parameters, tokens, steps, attention."""
    pt, ph, pw = config.patch_size
    width, height = (int(x) for x in SIZE.split("*"))
    tokens = (FRAMES // pt) * (height // ph) * (width // pw)
    return (
        f"{config.num_params() / 1e6:,.2f}M-parameter demo DiT (pixel space, "
        f"fpsa_jax/assets/demo), {SIZE} x {FRAMES} frames = {tokens} tokens; {steps} {solver} "
        f"steps, attention {attention}"
    )
