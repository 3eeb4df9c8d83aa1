"""The demo task: captioned moving shapes in pixel space, with held-out attribute combinations.

Why pixel space. The demo model denoises RGB videos directly (out_dim = 3), so there is no VAE
to train or ship, nothing between the DiT and the evaluator that could hide or create errors, and
`fpsa_jax.demo.evaluate` reads attributes straight from what the model produced. The DiT's
(1, 4, 4) patch does the VAE's job of shortening the sequence: a 9 x 32 x 32 clip becomes a
(9, 8, 8) token grid of L = 576 tokens; each token carries 4 * 4 * 3 = 48 pixel values, a quarter
of the model's width (192), so the velocity's noise part, which a pixel-space model must pass
through every token, does not fill the token (at a (1, 8, 8) patch, 192 values in a 192-wide
token, samples came out as speckled blobs with patch edges).

Why position channels. Wan has no absolute position embedding (only RoPE, which is relative), so
a Wan DiT has to infer *where* in the frame a token sits. This task asks for it: a shape that
moves left quickly starts in the right half of the frame, so the best guess at pure noise is a
caption- and position-dependent mean. Measured on the first demo model (no position channels):
its x0-prediction at sigma 0.999 was flat across the frame (std over x 0.011 where the true
conditional mean has 0.135) and its samples ignored the direction word. The model therefore gets,
like Wan I2V's concatenated `y`, three clean channels beside the noisy RGB: each pixel's x, y and
frame index scaled to [-1, 1] (`position_channels`; in_dim = 3 + 3), never noised. Same DiT
code, no new layer. Not measured: whether the final model needs them. A short ablation (1500
steps) gave the same loss with and without; the final model's output moves 7% when the x channel
is mirrored but under 1.3% when the frame channel is reversed, and what finally taught it the
direction was training at high noise (benchmarks/RESULTS.md, "Quality (demo model)").

Split. Each clip shows one (colour, shape, direction, speed); `HELD_OUT` removes six
(colour, shape, direction) combinations from training. Every colour, shape and direction value
still occurs in training, so the held-out captions test whether the model composes attributes it
learned separately, not whether it saw the caption.

Shapes: videos float32 [F, H, W, 3] in [-1, 1]; batches [B, F, H, W, 3] (the "latents" of the
training `Batch`, here pixels); text context [B, text_len, text_dim].
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np

from fpsa_jax.data.batch import StepSource, pad_text
from fpsa_jax.data.standin import StandInEncoder
from fpsa_jax.data.synthetic import (
    DIRECTIONS,
    PALETTE,
    SHAPES,
    SPEEDS,
    ClipAttributes,
    clip_attributes,
    render_many,
)

FRAMES, HEIGHT, WIDTH = 9, 32, 32
# The stand-in text encoder: one fixed random vector per word (fpsa_jax.data.StandInEncoder).
TEXT_DIM, TEXT_LEN, TEXT_SEED = 32, 8, 0

# (colour, shape, direction) never shown in training: a Latin-square-like pick, so each colour,
# each shape and each direction is held out at most twice and is seen in many other combinations.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "left"),
    ("green", "triangle", "right"),
    ("blue", "square", "up"),
    ("yellow", "circle", "down"),
    ("white", "triangle", "left"),
    ("magenta", "square", "right"),
)


POSITION_CHANNELS = 3  # x, y, frame


def position_channels() -> np.ndarray:
    """float32 [F, H, W, 3]: each pixel's (x, y, frame), pixel centres and frames scaled
    linearly to [-1, 1] (x to the right, y downwards, the first frame -1)."""

    def axis(n: int) -> np.ndarray:
        return ((np.arange(n) + 0.5) / n * 2 - 1).astype(np.float32)

    t, y, x = np.meshgrid(axis(FRAMES), axis(HEIGHT), axis(WIDTH), indexing="ij")
    return np.stack([x, y, t], axis=-1)


def model_condition(config) -> np.ndarray | None:
    """The `condition` a demo model with `config` (a WanConfig) takes: position channels
    [1, F, H, W, 3] when in_dim = 3 + POSITION_CHANNELS, None for a plain RGB model (in_dim 3)."""
    if config.in_dim == config.out_dim:
        return None
    if config.in_dim != config.out_dim + POSITION_CHANNELS:
        raise ValueError(
            f"a demo model has in_dim = out_dim (RGB only) or out_dim + {POSITION_CHANNELS} "
            f"(RGB and position channels), got in_dim={config.in_dim}, out_dim={config.out_dim}"
        )
    return position_channels()[None]


def text_encoder() -> StandInEncoder:
    """The demo's text encoder: captions -> float32 [Lt, TEXT_DIM] (no pooling of videos used)."""
    return StandInEncoder(text_dim=TEXT_DIM, max_text_length=TEXT_LEN, seed=TEXT_SEED)


def is_held_out(attrs: ClipAttributes) -> bool:
    """True when the clip's (colour, shape, direction) is one of `HELD_OUT`."""
    return (attrs.colour, attrs.shape, attrs.direction) in HELD_OUT


def train_attributes(seed: int, index: int) -> ClipAttributes:
    """Clip `index` of the training stream `seed`: `clip_attributes` (random placement), redrawn
    from derived seeds (deterministically) while it falls in `HELD_OUT`."""
    for k in itertools.count():
        attrs = clip_attributes(seed + 7919 * k, index, HEIGHT, WIDTH)
        if not is_held_out(attrs):
            return attrs
    raise AssertionError("unreachable")


def caption_attributes(
    colour: str, shape: str, direction: str, speed: str, variant: int = 0
) -> ClipAttributes:
    """Attributes of a clip with the given caption; `variant` picks the placement (the training
    clips' rule, drawn from the stream 10_000 + variant)."""
    for name, value, valid in (
        ("colour", colour, PALETTE),
        ("shape", shape, SHAPES),
        ("direction", direction, DIRECTIONS),
        ("speed", speed, SPEEDS),
    ):
        if value not in valid:
            raise ValueError(f"unknown {name} {value!r}; valid: {list(valid)}")
    for index in itertools.count():
        attrs = clip_attributes(10_000 + variant, index, HEIGHT, WIDTH)
        if attrs.direction == direction and attrs.speed == speed:
            return dataclasses.replace(attrs, shape=shape, colour=colour)
    raise AssertionError("unreachable")


def held_out_attributes() -> list[ClipAttributes]:
    """The evaluation captions: every held-out (colour, shape, direction) at both speeds (12)."""
    return [
        caption_attributes(c, s, d, speed)
        for (c, s, d), speed in itertools.product(HELD_OUT, SPEEDS)
    ]


def encode_captions(captions: list[str], encoder: StandInEncoder | None = None) -> np.ndarray:
    """Captions -> float32 [B, TEXT_LEN, TEXT_DIM], zero-padded (zeros = no token)."""
    encoder = text_encoder() if encoder is None else encoder
    return pad_text([encoder.encode_text(c) for c in captions], TEXT_LEN)[0]


class DemoSource(StepSource):
    """Endless training batches of the demo task: pixel videos as the `latents` of a `Batch`.

    Every batch carries the position channels as its `condition` ([B, 9, 32, 32, 3]; what a
    model with in_dim 6 needs; an RGB-only model's trainer leaves it out, see `train.loop`).
    Host `process_index` of `process_count` gets at global step s the clips s * P * B +
    process_index * B + [0, B) of the stream `seed` (held-out combinations never appear). Same
    interface as `fpsa_jax.data.SyntheticLatentSource`: iterate for `Batch`es (latents float32
    [B, 9, 32, 32, 3] in [-1, 1], context float32 [B, text_len, 32]); `state()` is a JSON-able
    dict and `DemoSource(..., state=state)` continues exactly there.
    """

    def __init__(
        self,
        batch_size: int,
        *,
        text_len: int = TEXT_LEN,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        state: dict[str, Any] | None = None,
    ):
        self.encoder = text_encoder()
        self._start(batch_size, text_len, seed, process_index, process_count, state)

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "source": "demo",
            "seed": self.seed,
            "batch_size": self.batch_size,
            "process_count": self.process_count,
        }

    def _examples(self, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
        clips = [train_attributes(self.seed, int(i)) for i in ids]
        captions = [a.caption for a in clips]
        videos = render_many(clips, FRAMES, HEIGHT, WIDTH)  # all clips at once: fast
        return videos, [self.encoder.encode_text(c) for c in captions], captions

    def _condition(self, batch_size: int) -> np.ndarray:
        return np.broadcast_to(position_channels(), (batch_size, FRAMES, HEIGHT, WIDTH, 3))
