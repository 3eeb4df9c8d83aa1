"""Procedural captioned videos: one coloured shape moving across a dark background.

Every clip is deterministic in (seed, index) and comes with its `ClipAttributes`, so an evaluator
can read back what a caption promised (colour, shape, direction, speed) and check generated
videos against it. Nothing is downloaded.

Videos are float32 [F, H, W, 3] in [-1, 1]; F frames of H x W pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

# Colours in [0, 1] RGB; far apart from each other and from the background.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.9, 0.1),
    "white": (0.95, 0.95, 0.95),
    "magenta": (0.9, 0.15, 0.85),
}
SHAPES = ("square", "circle", "triangle")
# Unit step in image coordinates (x to the right, y downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
# Distance covered over the whole clip, as a fraction of the frame's extent along the motion.
SPEEDS: dict[str, float] = {"slow": 0.2, "fast": 0.5}
ADVERBS = {"slow": "slowly", "fast": "quickly"}
BACKGROUND = (0.06, 0.06, 0.08)
# Shape radius as a fraction of min(H, W).
RADIUS_FRACTION = 0.14
_SUPERSAMPLE = 2  # sub-pixel samples per axis, so slow motion moves smoothly


@dataclasses.dataclass(frozen=True)
class ClipAttributes:
    """What a synthetic clip shows. Positions are shape centres in pixels (x right, y down)."""

    shape: str
    colour: str
    direction: str
    speed: str
    radius: float
    start: tuple[float, float]
    end: tuple[float, float]

    @property
    def caption(self) -> str:
        """E.g. 'a red circle moves left slowly'."""
        return f"a {self.colour} {self.shape} moves {self.direction} {ADVERBS[self.speed]}"

    def centre(self, frame, frames: int) -> tuple[Any, Any]:
        """Shape centre (x, y) at `frame` of a clip of `frames` frames (linear motion); `frame`
        may be an int array, giving arrays of x and y."""
        t = frame / max(frames - 1, 1)
        return (
            self.start[0] + t * (self.end[0] - self.start[0]),
            self.start[1] + t * (self.end[1] - self.start[1]),
        )


def _check_size(frames: int, height: int, width: int) -> None:
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"synthetic clip {name} must be a positive int, got {value!r}")
    if min(height, width) < 8:
        raise ValueError(f"synthetic clips need at least 8x8 pixels, got {height}x{width}")


def clip_attributes(seed: int, index: int, height: int, width: int) -> ClipAttributes:
    """The attributes of clip `index` of the stream `seed`, placed so the shape stays inside an
    H x W frame for the whole clip."""
    if index < 0:
        raise ValueError(f"synthetic clip index must be >= 0, got {index}")
    rng = np.random.default_rng([seed, index])
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(PALETTE)[rng.integers(len(PALETTE))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    speed = list(SPEEDS)[rng.integers(len(SPEEDS))]
    radius = RADIUS_FRACTION * min(height, width)
    dx, dy = DIRECTIONS[direction]
    extent = width if dx else height
    travel = SPEEDS[speed] * extent
    # Free range of the centre along each axis: [radius, size - radius].
    lo_x, hi_x = radius, width - radius
    lo_y, hi_y = radius, height - radius
    # Along the motion the start leaves room for the travel; across it any position fits.
    if dx:
        x0 = rng.uniform(lo_x, hi_x - travel) if dx > 0 else rng.uniform(lo_x + travel, hi_x)
        y0 = rng.uniform(lo_y, hi_y)
    else:
        x0 = rng.uniform(lo_x, hi_x)
        y0 = rng.uniform(lo_y, hi_y - travel) if dy > 0 else rng.uniform(lo_y + travel, hi_y)
    start = (float(x0), float(y0))
    end = (float(x0 + dx * travel), float(y0 + dy * travel))
    return ClipAttributes(shape, colour, direction, speed, float(radius), start, end)


def _coverage(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean inside-test of sample offsets (dx, dy) from the shape centre."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        half = 0.886 * r  # same area as the circle
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        # Apex up at (0, -r), base at y = 0.8 r spanning [-r, r].
        return (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) / 1.8)
    raise ValueError(f"unknown shape {shape!r}; valid: {list(SHAPES)}")


def render(attrs: ClipAttributes, frames: int, height: int, width: int) -> np.ndarray:
    """float32 video [F, H, W, 3] in [-1, 1] of the clip `attrs` describes."""
    return render_many([attrs], frames, height, width)[0]


def render_many(
    clips: Sequence[ClipAttributes], frames: int, height: int, width: int
) -> np.ndarray:
    """float32 videos [N, F, H, W, 3] in [-1, 1] of N clips, drawn together (the training loop
    draws a batch per step on the host; a clip at a time cost ~0.3 ms, mostly Python)."""
    _check_size(frames, height, width)
    if not clips:
        raise ValueError("render_many needs at least one clip")
    for attrs in clips:
        if attrs.shape not in SHAPES:
            raise ValueError(f"unknown shape {attrs.shape!r}; valid: {list(SHAPES)}")
        if attrs.colour not in PALETTE:
            raise ValueError(f"unknown colour {attrs.colour!r}; valid: {list(PALETTE)}")
    n, s = len(clips), _SUPERSAMPLE
    radius = np.array([a.radius for a in clips])  # [N]
    every_frame = np.arange(frames)
    centres = np.array([np.stack(a.centre(every_frame, frames), -1) for a in clips])  # [N, F, 2]
    # Only a box of `size` pixels around each shape is sampled (sub-pixel grid of s x s per
    # pixel): it starts one pixel before the shape's extent and ends at least one after it, and
    # is pasted into a canvas padded by `size` on every side, then cropped.
    size = int(np.ceil(2 * radius.max())) + 3
    first = np.floor(centres - radius[:, None, None]).astype(np.int64) - 1  # [N, F, (x, y)]
    pixels = first[:, :, None, :] + np.arange(size)[:, None]  # [N, F, size, (x, y)]
    sub = (np.arange(s) + 0.5) / s  # sample offsets inside a pixel
    samples = (pixels[:, :, :, None, :] + sub[:, None]).reshape(n, frames, size * s, 2)
    dx = (samples[..., 0] - centres[:, :, None, 0])[:, :, None, :]  # [N, F, 1, size*s]
    dy = (samples[..., 1] - centres[:, :, None, 1])[:, :, :, None]  # [N, F, size*s, 1]
    inside = np.zeros((n, frames, size * s, size * s), bool)
    for shape in SHAPES:
        of_shape = np.array([a.shape == shape for a in clips])
        if of_shape.any():
            r = radius[of_shape, None, None, None]
            inside[of_shape] = _coverage(shape, dx[of_shape], dy[of_shape], r)
    cover = inside.reshape(n, frames, size, s, size, s).mean(axis=(3, 5), dtype=np.float32)
    canvas = np.zeros((n, frames, height + 2 * size, width + 2 * size), np.float32)
    rows = np.clip(pixels[..., 1], -size, height + size - 1) + size  # [N, F, size]
    cols = np.clip(pixels[..., 0], -size, width + size - 1) + size
    canvas[
        np.arange(n)[:, None, None, None],
        np.arange(frames)[None, :, None, None],
        rows[:, :, :, None],
        cols[:, :, None, :],
    ] = cover
    cover = canvas[:, :, size : size + height, size : size + width]
    # Blending is linear, so it happens directly in [-1, 1]; a channel at a time, as NumPy
    # broadcasts over a last axis of 3 slowly.
    background = np.asarray(BACKGROUND, np.float32) * 2 - 1
    colours = np.array([PALETTE[a.colour] for a in clips], np.float32) * 2 - 1  # [N, 3]
    delta = colours - background
    video = np.empty((n, frames, height, width, 3), np.float32)
    for c in range(3):
        video[..., c] = background[c] + cover * delta[:, c, None, None, None]
    return video


def synthetic_clip(
    seed: int, index: int, frames: int, height: int, width: int
) -> tuple[np.ndarray, str, ClipAttributes]:
    """(video [F, H, W, 3] in [-1, 1], caption, attributes) of clip `index` of stream `seed`."""
    _check_size(frames, height, width)
    attrs = clip_attributes(seed, index, height, width)
    return render(attrs, frames, height, width), attrs.caption, attrs
