"""The demo task: captioned moving shapes in pixel space, with held-out attribute combinations.

Why pixel space. The demo model denoises RGB videos directly (in_dim = out_dim = 3), so there is
no VAE to train or ship, nothing between the DiT and the evaluator that could hide or create
errors, and `fpsa_jax.demo.evaluate` reads attributes straight from what the model produced. The
DiT's (1, 8, 8) patch does the VAE's job of shortening the sequence: a 9 x 32 x 32 clip becomes a
(9, 4, 4) token grid of L = 144 tokens, each token an 8 x 8 pixel patch about the size of the shape.

Why that patch. With a (1, 4, 4) patch (576 tokens) the model, after 600-800 steps at batch 8 (what
a CPU affords in ~15 minutes), had learned the colours but not to form one coherent shape: shape
and direction were read at chance, with scattered patches of colour instead of one shape. Wan has
no absolute position embedding (only RoPE), so the tokens must agree among themselves where the
shape goes; 16 places per frame instead of 64, and cheaper steps (so batch 16 and more steps in
the same time), make that learnable in the budget. The model width (192, preset "demo") is at least
the 8 * 8 * 3 = 192 values of a patch: at width 128 the loss plateaued near 0.47, since the
velocity's noise part cannot pass through a narrower token.

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
    render,
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

    def _example(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        attrs = train_attributes(self.seed, i)
        video = render(attrs, FRAMES, HEIGHT, WIDTH)
        return video, self.encoder.encode_text(attrs.caption), attrs.caption
