"""A folder of captioned clips (`clip.mp4` + `clip.txt`) read into fixed-size videos.

Clips are decoded by ffmpeg (imageio-ffmpeg), resampled to a frame rate, scaled to cover the
target size and center-cropped to it; videos are float32 [F, H, W, 3] in [-1, 1].
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import warnings
from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")


class ClipTooShortError(ValueError):
    """A clip has fewer frames (after frame-rate resampling) than asked for."""


@dataclasses.dataclass(frozen=True)
class Clip:
    """A video file and its caption (the text of the .txt beside it, whitespace-stripped)."""

    path: Path
    caption: str


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A file left out of a dataset, and why."""

    path: Path
    reason: str


def find_clips(videos_dir: str | Path) -> tuple[list[Clip], list[Skipped]]:
    """Videos under `videos_dir` (recursively, sorted by path) with a non-empty caption file of the
    same name and suffix .txt; the others are returned as Skipped with the reason."""
    root = Path(videos_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"videos directory not found: {root}")
    clips, skipped = [], []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES):
        caption_file = path.with_suffix(".txt")
        if not caption_file.is_file():
            skipped.append(Skipped(path, f"no caption file {caption_file.name} beside it"))
            continue
        caption = caption_file.read_text(encoding="utf-8").strip()
        if not caption:
            skipped.append(Skipped(path, f"caption file {caption_file.name} is empty"))
            continue
        clips.append(Clip(path, caption))
    return clips, skipped


@contextlib.contextmanager
def _quiet_fork():
    """ffmpeg runs as an exec'd subprocess; Python's warning about forking a multithreaded (JAX)
    process does not apply to it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*os.fork", category=RuntimeWarning)
        yield


def _source_size(path: Path) -> tuple[int, int]:
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        with _quiet_fork():
            return tuple(next(reader)["size"])
    finally:
        reader.close()


def read_clip(path: str | Path, *, width: int, height: int, frames: int, fps: float) -> np.ndarray:
    """The first `frames` frames of the video at `path`, resampled to `fps` (0 keeps the source
    rate), scaled to cover width x height and center-cropped: float32 [F, H, W, 3] in [-1, 1].

    Raises ClipTooShortError when the clip has fewer frames; ffmpeg's errors (unreadable file)
    pass through as RuntimeError or OSError.
    """
    import imageio_ffmpeg

    path = Path(path)
    src_w, src_h = _source_size(path)
    scale = max(width / src_w, height / src_h)
    scaled_w, scaled_h = max(math.ceil(src_w * scale), width), max(math.ceil(src_h * scale), height)
    filters = [f"scale={scaled_w}:{scaled_h}", f"crop={width}:{height}"]
    if fps:
        filters.insert(0, f"fps={fps}")
    reader = imageio_ffmpeg.read_frames(str(path), output_params=["-vf", ",".join(filters)])
    out = np.empty((frames, height, width, 3), np.float32)
    count = 0
    try:
        # read_frames prints a note when the output size differs from the source: expected here.
        with contextlib.redirect_stdout(io.StringIO()), _quiet_fork():
            next(reader)
        for raw in reader:
            frame = np.frombuffer(raw, np.uint8).reshape(height, width, 3)
            out[count] = frame.astype(np.float32) / 127.5 - 1.0
            count += 1
            if count == frames:
                break
    finally:
        reader.close()
    if count < frames:
        rate = f" at {fps:g} fps" if fps else ""
        raise ClipTooShortError(f"has {count} frames{rate}, needs {frames}")
    return out
