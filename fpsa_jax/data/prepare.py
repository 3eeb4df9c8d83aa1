"""Encoding clips into records: the library side of `python -m train.prepare`.

A source item is (name, load, caption): `load()` returns the video [F, H, W, 3] in [-1, 1] or
raises ClipTooShortError / RuntimeError / OSError, in which case the item is skipped with the
reason and the run goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from fpsa_jax.data.encoders import Encoder
from fpsa_jax.data.records import RecordWriter
from fpsa_jax.data.synthetic import synthetic_clip
from fpsa_jax.data.videos import Clip, ClipTooShortError, Skipped, read_clip

Item = tuple[str, Callable[[], np.ndarray], str]


def synthetic_items(n: int, *, seed: int, frames: int, height: int, width: int) -> Iterator[Item]:
    """Synthetic clips 0 .. n - 1 of the stream `seed` (see `fpsa_jax.data.synthetic`)."""
    for i in range(n):
        video, caption, _ = synthetic_clip(seed, i, frames, height, width)
        yield f"synthetic-{i:06d}", (lambda v=video: v), caption


def clip_items(
    clips: Iterable[Clip], *, frames: int, height: int, width: int, fps: float
) -> Iterator[Item]:
    """Clips found by `find_clips`, read lazily by `read_clip`."""
    for clip in clips:

        def load(path=clip.path):
            return read_clip(path, width=width, height=height, frames=frames, fps=fps)

        yield str(clip.path), load, clip.caption


def encode_to_records(
    items: Iterable[Item],
    encoder: Encoder,
    writer: RecordWriter,
    progress: Callable[[], None] | None = None,
) -> list[Skipped]:
    """Encodes each item into `writer` (not closed here); returns the skipped items. `progress`
    is called once per item."""
    skipped = []
    for name, load, caption in items:
        try:
            video = load()
        except ClipTooShortError as e:
            skipped.append(Skipped(Path(name), f"too short: {e}"))
        except (RuntimeError, OSError) as e:
            skipped.append(Skipped(Path(name), f"cannot be read: {str(e).strip()[:200]}"))
        else:
            writer.add(encoder.encode_video(video), encoder.encode_text(caption), caption)
        if progress is not None:
            progress()
    return skipped
