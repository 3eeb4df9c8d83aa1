"""Writing results: mp4 through imageio-ffmpeg and .npy, each written aside then renamed so a
failure never leaves a half-written file behind."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np


def to_uint8(video: np.ndarray) -> np.ndarray:
    """[F, H, W, 3] in [-1, 1] -> uint8 [F, H, W, 3]."""
    return np.round((np.clip(video, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def save_video(path: Path, video: np.ndarray, fps: int) -> None:
    """Encodes video [F, H, W, 3] in [-1, 1] as H.264 mp4 at `path`."""
    import imageio_ffmpeg

    frames = to_uint8(video)
    _, height, width, _ = frames.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".mp4", prefix=f".{path.stem}.", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            # ffmpeg runs as a subprocess; Python warns about forking a multithreaded (JAX)
            # process, which is harmless for an exec'd child.
            warnings.filterwarnings("ignore", message=".*os.fork", category=RuntimeWarning)
            writer = imageio_ffmpeg.write_frames(
                tmp,
                (width, height),
                fps=fps,
                codec="libx264",
                pix_fmt_out="yuv420p",
                macro_block_size=1,
                quality=8,
                ffmpeg_log_level="error",
            )
            writer.send(None)  # starts ffmpeg
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to `path`, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npy", prefix=f".{path.stem}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
