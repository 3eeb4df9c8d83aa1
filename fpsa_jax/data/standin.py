"""A cheap stand-in for the Wan VAE and UMT5, and a batch source built on it.

NOT the real encoders: `StandInEncoder` maps a video to latent shape by average pooling and a
fixed random 3 -> C projection, and a caption to one fixed random vector per word. It keeps the
shapes, the determinism and a little of the content (colour, position, words) so trainer tests and
the demo run without checkpoints; a model trained on it learns nothing about real video.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import zlib
from typing import Any

import numpy as np

from fpsa_jax.data.batch import StepSource, pad_text
from fpsa_jax.data.synthetic import synthetic_clip


@functools.lru_cache(maxsize=4096)
def _word_vector(seed: int, word: str, dim: int) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(word.encode("utf-8"))])
    return rng.standard_normal(dim).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class StandInEncoder:
    """Deterministic stand-in for (Wan VAE, UMT5): same output shapes, no weights.

    Video [F, H, W, 3] -> latent float32 [1 + (F - 1) / t, H / s, W / s, C]: frame 1 alone, then
    the mean of each group of t frames (the VAE's causal 1 + 4k layout), s x s average pooling,
    then a fixed random [3, C] projection. Caption -> float32 [Lt, E]: one fixed random vector per
    lower-cased word plus an end-of-text vector (like UMT5's EOS), cut at max_text_length.
    """

    text_dim: int = 4096
    latent_channels: int = 16
    temporal_factor: int = 4
    spatial_factor: int = 8
    max_text_length: int = 512
    seed: int = 0

    def __post_init__(self):
        for name in (
            "text_dim",
            "latent_channels",
            "temporal_factor",
            "spatial_factor",
            "max_text_length",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StandInEncoder.{name} must be a positive int, got {value!r}")

    @property
    def projection(self) -> np.ndarray:
        """float32 [3, C], the fixed colour -> latent-channel projection."""
        rng = np.random.default_rng([self.seed, 3])
        return (rng.standard_normal((3, self.latent_channels)) / np.sqrt(3)).astype(np.float32)

    def encode_video(self, video: np.ndarray) -> np.ndarray:
        """[F, H, W, 3] in [-1, 1] -> float32 [f, h, w, C]."""
        video = np.asarray(video, np.float32)
        t, s = self.temporal_factor, self.spatial_factor
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"video must be [F, H, W, 3], got shape {video.shape}")
        frames, height, width, _ = video.shape
        if (frames - 1) % t or height % s or width % s:
            raise ValueError(
                f"video must have 1 + {t}k frames and height, width multiples of {s}, got "
                f"shape {video.shape}"
            )
        rest = video[1:].reshape((frames - 1) // t, t, height, width, 3).mean(axis=1)
        frames_ = np.concatenate([video[:1], rest], axis=0)
        pooled = frames_.reshape(-1, height // s, s, width // s, s, 3).mean(axis=(2, 4))
        return np.einsum("fhwc,cz->fhwz", pooled, self.projection).astype(np.float32)

    def encode_text(self, caption: str) -> np.ndarray:
        """Caption -> float32 [Lt, E], Lt = words + 1 (end of text), at most max_text_length."""
        words = re.findall(r"\w+", caption.lower()) + ["</s>"]
        words = words[: self.max_text_length]
        return np.stack([_word_vector(self.seed, w, self.text_dim) for w in words])

    def describe(self) -> dict[str, Any]:
        """What wrote a dataset, for its index: marks it as stand-in data."""
        return {"encoder": "stand-in", **dataclasses.asdict(self)}


class SyntheticLatentSource(StepSource):
    """Endless batches of stand-in (latents, context) of synthetic clips, with no files.

    Host `process_index` of `process_count` gets at global step s the clips s * P * B +
    process_index * B + [0, B) of the stream `seed` (B = batch_size, P = process_count), so hosts
    never overlap. Same interface as `Loader`: iterate for `Batch`es; `state()` is a JSON-able
    dict and `SyntheticLatentSource(..., state=state)` continues exactly there.

    Batches: latents float32 [B, f, h, w, C] with f = 1 + (frames - 1) / 4, (h, w) = (height,
    width) / 8 for the default encoder; context float32 [B, text_len, E].
    """

    def __init__(
        self,
        batch_size: int,
        *,
        frames: int,
        height: int,
        width: int,
        text_len: int,
        encoder: StandInEncoder | None = None,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        state: dict[str, Any] | None = None,
    ):
        self.encoder = StandInEncoder() if encoder is None else encoder
        self.frames, self.height, self.width = frames, height, width
        self._start(batch_size, text_len, seed, process_index, process_count, state)
        # Fail at construction, not at the first batch, on a bad size.
        self.encoder.encode_video(np.zeros((frames, height, width, 3), np.float32))
        pad_text([np.zeros((1, 1), np.float32)], text_len)

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "source": "synthetic",
            "seed": self.seed,
            "batch_size": self.batch_size,
            "process_count": self.process_count,
        }

    def _example(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        video, caption, _ = synthetic_clip(self.seed, i, self.frames, self.height, self.width)
        return self.encoder.encode_video(video), self.encoder.encode_text(caption), caption
