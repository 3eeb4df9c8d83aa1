"""An analytic evaluator: reads (colour, shape, direction, speed) back from a video's pixels.

Pure NumPy over one video [F, H, W, 3] in [-1, 1] of the synthetic task (`fpsa_jax.data.synthetic`:
one shape of radius RADIUS_FRACTION * min(H, W) on the BACKGROUND colour). No learned parts:

- colour: the per-channel median of the clearly-foreground pixels (farther than half the smallest
  palette-to-background distance from the background), matched to the nearest palette colour.
- coverage: per pixel, the fraction of that colour over the background (the projection of
  pixel - background on colour - background), which is how the renderer blends antialiased edges;
  values under `NOISE_FLOOR` count as background so a slightly noisy background does not pull the
  centroid.
- direction and speed: the coverage-weighted centroid of each frame with enough coverage; a
  least-squares line through those centroids gives the displacement over the clip. The dominant
  axis and its sign give the direction; the travelled distance over the frame's extent along that
  axis, compared with the midpoint of the two SPEEDS fractions, gives the speed.
- shape: template matching. Each candidate shape is rendered at the measured centroid (searching
  sub-pixel offsets, since a triangle's centroid is not its centre) and compared with the coverage
  map by soft IoU (sum min / sum max); the best mean IoU over frames wins. Pixel statistics such as
  bounding-box fill misread circles as squares at this size (a 9-pixel circle's thin left and
  right edges fall under any threshold), template matching does not.

A video with no visible shape gets "none" for every attribute (scored wrong).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from fpsa_jax.data.synthetic import (
    BACKGROUND,
    DIRECTIONS,
    PALETTE,
    RADIUS_FRACTION,
    SHAPES,
    SPEEDS,
    ClipAttributes,
    render,
)

ATTRIBUTES = ("colour", "shape", "direction", "speed")
NOISE_FLOOR = 0.2
# A frame counts when its coverage sums to this fraction of the shape's area (~2.9 r^2 on average).
MIN_FRAME_MASS = 0.25
_BG = np.asarray(BACKGROUND, np.float64) * 2 - 1
_COLOURS = {name: np.asarray(rgb, np.float64) * 2 - 1 for name, rgb in PALETTE.items()}
_CORE_DISTANCE = 0.5 * min(np.linalg.norm(c - _BG) for c in _COLOURS.values())
_OFFSETS = np.arange(-1.5, 1.51, 0.5)  # centroid-to-centre offsets searched (pixels)


@dataclasses.dataclass(frozen=True)
class VideoAttributes:
    """What `read_attributes` measured. Names are "none" when no shape was found.

    displacement: (dx, dy) pixels over the clip (x right, y down); shape_scores: soft IoU per
    candidate shape; frames_used: frames with enough coverage for a centroid.
    """

    colour: str
    shape: str
    direction: str
    speed: str
    displacement: tuple[float, float]
    shape_scores: dict[str, float]
    frames_used: int

    def as_dict(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


_NONE = VideoAttributes("none", "none", "none", "none", (0.0, 0.0), {}, 0)


def coverage_map(video: np.ndarray, colour: str) -> np.ndarray:
    """float64 [F, H, W] in [0, 1]: how much of `colour` each pixel holds over the background."""
    axis = _COLOURS[colour] - _BG
    c = np.einsum("fhwc,c->fhw", np.asarray(video, np.float64) - _BG, axis) / (axis @ axis)
    c = np.clip(c, 0.0, 1.0)
    return np.where(c < NOISE_FLOOR, 0.0, c)


def read_colour(video: np.ndarray) -> str | None:
    """The palette colour of the clearly-foreground pixels, or None when there are none."""
    pixels = np.asarray(video, np.float64).reshape(-1, 3)
    core = pixels[np.linalg.norm(pixels - _BG, axis=-1) > _CORE_DISTANCE]
    if core.shape[0] == 0:
        return None
    median = np.median(core, axis=0)
    return min(_COLOURS, key=lambda name: np.linalg.norm(_COLOURS[name] - median))


def centroids(coverage: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(frame indices [K], centroids [K, 2] as (x, y)) of the frames with enough coverage."""
    mass = coverage.sum(axis=(1, 2))
    keep = np.flatnonzero(mass >= MIN_FRAME_MASS * 2.9 * radius * radius)
    _, h, w = coverage.shape
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5  # pixel centres
    cx = np.einsum("fhw,w->f", coverage[keep], xs) / mass[keep]
    cy = np.einsum("fhw,h->f", coverage[keep], ys) / mass[keep]
    return keep, np.stack([cx, cy], axis=-1)


def read_motion(frames: np.ndarray, points: np.ndarray, num_frames: int, size: tuple[int, int]):
    """(direction, speed, (dx, dy)) from centroids `points` [K, 2] at frame indices `frames`.

    size: (H, W). The displacement over the clip is the least-squares slope times (F - 1).
    """
    if frames.shape[0] < 2:
        return "none", "none", (0.0, 0.0)
    t = frames / max(num_frames - 1, 1)
    t_c = t - t.mean()
    slope = (t_c[:, None] * (points - points.mean(axis=0))).sum(axis=0) / (t_c @ t_c)
    dx, dy = float(slope[0]), float(slope[1])
    if abs(dx) >= abs(dy):
        direction, travel, extent = ("right" if dx > 0 else "left"), abs(dx), size[1]
    else:
        direction, travel, extent = ("down" if dy > 0 else "up"), abs(dy), size[0]
    threshold = (SPEEDS["slow"] + SPEEDS["fast"]) / 2
    speed = "fast" if travel / extent > threshold else "slow"
    return direction, speed, (dx, dy)


def _template(shape: str, centre: tuple[float, float], radius: float, h: int, w: int):
    attrs = ClipAttributes(shape, "white", "right", "slow", radius, centre, centre)
    frame = render(attrs, 1, h, w)[0]
    return coverage_map(frame[None], "white")[0]


def read_shape(coverage: np.ndarray, frames: np.ndarray, points: np.ndarray, radius: float):
    """(best shape, {shape: mean soft IoU}) over the frames with a centroid."""
    _, h, w = coverage.shape
    scores = {}
    for shape in SHAPES:
        per_frame = []
        for f, (cx, cy) in zip(frames, points, strict=True):
            best = 0.0
            for ox, oy in itertools.product(_OFFSETS, _OFFSETS):
                t = _template(shape, (cx + ox, cy + oy), radius, h, w)
                a = coverage[f]
                best = max(best, np.minimum(a, t).sum() / max(np.maximum(a, t).sum(), 1e-9))
            per_frame.append(best)
        scores[shape] = float(np.mean(per_frame))
    return max(scores, key=scores.get), scores


def read_attributes(video: np.ndarray) -> VideoAttributes:
    """Measures one video [F, H, W, 3] in [-1, 1] (see the module docstring)."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must be [F, H, W, 3], got shape {video.shape}")
    num_frames, h, w, _ = video.shape
    colour = read_colour(video)
    if colour is None:
        return _NONE
    radius = RADIUS_FRACTION * min(h, w)
    coverage = coverage_map(video, colour)
    frames, points = centroids(coverage, radius)
    if frames.shape[0] == 0:
        return dataclasses.replace(_NONE, colour=colour)
    direction, speed, displacement = read_motion(frames, points, num_frames, (h, w))
    # Shape on at most 5 evenly spaced frames: enough, and template search is the costly part.
    pick = np.unique(np.linspace(0, frames.shape[0] - 1, min(5, frames.shape[0])).round())
    pick = pick.astype(int)
    shape, scores = read_shape(coverage, frames[pick], points[pick], radius)
    return VideoAttributes(
        colour, shape, direction, speed, displacement, scores, int(frames.shape[0])
    )


def attribute_accuracy(
    measured: Sequence[VideoAttributes], targets: Sequence[ClipAttributes]
) -> dict[str, float]:
    """Fraction of videos whose attribute matches the caption, per attribute, and "all" (every
    attribute right)."""
    if len(measured) != len(targets) or not targets:
        raise ValueError(
            f"need as many measurements as targets (> 0), got {len(measured)} and {len(targets)}"
        )
    hits = {
        a: [getattr(m, a) == getattr(t, a) for m, t in zip(measured, targets, strict=True)]
        for a in ATTRIBUTES
    }
    out = {a: float(np.mean(h)) for a, h in hits.items()}
    out["all"] = float(np.mean(np.all([hits[a] for a in ATTRIBUTES], axis=0)))
    return out


def chance_accuracy() -> dict[str, float]:
    """Accuracy of uniform guessing, per attribute."""
    sizes = {"colour": len(PALETTE), "shape": len(SHAPES), "direction": len(DIRECTIONS)}
    sizes["speed"] = len(SPEEDS)
    out = {a: 1.0 / n for a, n in sizes.items()}
    out["all"] = float(np.prod(list(out.values())))
    return out
