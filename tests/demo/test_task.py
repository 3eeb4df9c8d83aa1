"""The demo task: held-out combinations never reach training, every value still does, and the
training source is deterministic and resumable."""

import itertools

import numpy as np
import pytest

from fpsa_jax.data.synthetic import DIRECTIONS, PALETTE, SHAPES, SPEEDS
from fpsa_jax.demo.task import (
    FRAMES,
    HEIGHT,
    HELD_OUT,
    TEXT_DIM,
    TEXT_LEN,
    WIDTH,
    DemoSource,
    caption_attributes,
    encode_captions,
    held_out_attributes,
    is_held_out,
    train_attributes,
)


def test_training_never_shows_a_held_out_combination_but_shows_every_value():
    attrs = [train_attributes(0, i) for i in range(600)]
    assert not any(is_held_out(a) for a in attrs)
    assert {a.colour for a in attrs} == set(PALETTE)
    assert {a.shape for a in attrs} == set(SHAPES)
    assert {a.direction for a in attrs} == set(DIRECTIONS)
    assert {a.speed for a in attrs} == set(SPEEDS)


def test_held_out_values_are_each_seen_elsewhere_in_training():
    for values in zip(*HELD_OUT, strict=True):
        assert len(set(values)) > 1  # no value held out in every combination
    for colour, shape, direction in HELD_OUT:
        others = [c for c in itertools.product(PALETTE, SHAPES, DIRECTIONS) if c not in HELD_OUT]
        assert any(o[0] == colour for o in others) and any(o[1] == shape for o in others)
        assert any(o[2] == direction for o in others)


def test_held_out_captions_are_all_combinations_at_both_speeds():
    attrs = held_out_attributes()
    assert len(attrs) == len(HELD_OUT) * len(SPEEDS) == len({a.caption for a in attrs})
    assert all(is_held_out(a) for a in attrs)
    a = caption_attributes("red", "circle", "left", "fast")
    assert a.caption == "a red circle moves left quickly"
    # the shape stays inside the frame for the whole clip
    for x, y in (a.start, a.end):
        assert a.radius <= x <= WIDTH - a.radius and a.radius <= y <= HEIGHT - a.radius


def test_unknown_caption_values_are_refused():
    with pytest.raises(ValueError, match="unknown colour 'purple'"):
        caption_attributes("purple", "circle", "left", "fast")


def test_source_batches_are_deterministic_and_resume_exactly():
    a = DemoSource(3, seed=1)
    first, second = next(a), next(a)
    assert first.latents.shape == (3, FRAMES, HEIGHT, WIDTH, 3)
    assert first.context.shape == (3, TEXT_LEN, TEXT_DIM)
    resumed = DemoSource(3, seed=1, state={**a.state(), "step": 1})
    np.testing.assert_array_equal(next(resumed).latents, second.latents)
    assert next(DemoSource(3, seed=1)).captions == first.captions
    np.testing.assert_array_equal(encode_captions(list(first.captions)), first.context)
    with pytest.raises(ValueError, match="state does not belong to this source: seed"):
        DemoSource(3, seed=2, state=a.state())
