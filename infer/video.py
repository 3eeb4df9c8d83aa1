"""Writing results: mp4 through imageio-ffmpeg and .npy, each written aside then renamed
(`fpsa_jax.outputs.atomic_file`) so a failure, Ctrl-C or SIGTERM never leaves a half-written
file behind; and the default name of a video (`default_save_file`)."""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

import numpy as np

from fpsa_jax.outputs import atomic_file


def default_save_file(task: str, size: str, seed: int, prompt: str) -> Path:
    """outputs/TASK_WxH_SEED_SLUG_HASH.mp4: SLUG is the prompt's ASCII letters and digits (50 at
    most, "video" when there are none), HASH 8 hex digits of the whole prompt's SHA-256, so
    prompts that differ anywhere (past 50 characters, in non-ASCII letters) get other names."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt)[:50].strip("_") or "video"
    digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8]
    return Path("outputs") / f"{task}_{size.replace('*', 'x')}_{seed}_{slug}_{digest}.mp4"


def to_uint8(video: np.ndarray) -> np.ndarray:
    """[F, H, W, 3] in [-1, 1] -> uint8 [F, H, W, 3]."""
    return np.round((np.clip(video, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def save_video(path: Path, video: np.ndarray, fps: int) -> None:
    """Encodes video [F, H, W, 3] in [-1, 1] as H.264 mp4 at `path`."""
    import imageio_ffmpeg

    frames = to_uint8(video)
    _, height, width, _ = frames.shape
    with atomic_file(path) as tmp, warnings.catch_warnings():
        # ffmpeg runs as a subprocess; Python warns about forking a multithreaded (JAX)
        # process, which is harmless for an exec'd child.
        warnings.filterwarnings("ignore", message=".*os.fork", category=RuntimeWarning)
        writer = imageio_ffmpeg.write_frames(
            str(tmp),
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            macro_block_size=1,
            quality=8,
            ffmpeg_log_level="error",
        )
        try:
            writer.send(None)  # starts ffmpeg
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
        finally:
            writer.close()  # waits for ffmpeg, or stops it when a frame failed


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to `path`, atomically."""
    with atomic_file(path) as tmp, tmp.open("wb") as f:
        np.save(f, array)
