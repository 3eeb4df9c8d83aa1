"""Training data: synthetic captioned clips, precomputed-latent records and their loader."""

from fpsa_jax.data.batch import Batch, pad_text
from fpsa_jax.data.loader import Loader
from fpsa_jax.data.records import Example, Records, RecordWriter
from fpsa_jax.data.standin import StandInEncoder, SyntheticLatentSource
from fpsa_jax.data.synthetic import (
    DIRECTIONS,
    PALETTE,
    SHAPES,
    SPEEDS,
    ClipAttributes,
    clip_attributes,
    render,
    render_many,
    synthetic_clip,
)
from fpsa_jax.data.videos import Clip, ClipTooShortError, Skipped, find_clips, read_clip

__all__ = [
    "DIRECTIONS",
    "PALETTE",
    "SHAPES",
    "SPEEDS",
    "Batch",
    "Clip",
    "ClipAttributes",
    "ClipTooShortError",
    "Example",
    "Loader",
    "RecordWriter",
    "Records",
    "Skipped",
    "StandInEncoder",
    "SyntheticLatentSource",
    "clip_attributes",
    "find_clips",
    "pad_text",
    "read_clip",
    "render",
    "render_many",
    "synthetic_clip",
]
