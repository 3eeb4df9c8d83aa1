"""The demo task: held-out combinations never reach training, every value still does, and the
training source is deterministic and resumable."""

import itertools

import numpy as np
import pytest

from fpsa_jax.config import WanConfig
from fpsa_jax.data.synthetic import DIRECTIONS, PALETTE, SHAPES, SPEEDS, render
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
    model_condition,
    position_channels,
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


def test_source_batches_are_the_training_clips_with_their_captions_and_position_channels():
    batch = next(DemoSource(4, seed=3))
    for i, video in zip(batch.example_ids, batch.latents, strict=True):
        attrs = train_attributes(3, int(i))
        np.testing.assert_array_equal(video, render(attrs, FRAMES, HEIGHT, WIDTH))
    assert batch.captions == tuple(train_attributes(3, int(i)).caption for i in range(4))
    assert batch.condition.shape == (4, FRAMES, HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(batch.condition[2], position_channels())


def test_position_channels_are_x_y_and_frame_of_each_pixel_in_minus_one_to_one():
    pos = position_channels()
    assert pos.shape == (FRAMES, HEIGHT, WIDTH, 3) and pos.dtype == np.float32
    x, y, t = pos[..., 0], pos[..., 1], pos[..., 2]
    # pixel centres: (i + 0.5) / n * 2 - 1, so symmetric about 0 and inside (-1, 1)
    np.testing.assert_allclose(x[0, 0], (np.arange(WIDTH) + 0.5) / WIDTH * 2 - 1, rtol=1e-6)
    np.testing.assert_allclose(y[0, :, 0], (np.arange(HEIGHT) + 0.5) / HEIGHT * 2 - 1, rtol=1e-6)
    np.testing.assert_allclose(t[:, 0, 0], (np.arange(FRAMES) + 0.5) / FRAMES * 2 - 1, rtol=1e-6)
    assert (np.diff(x, axis=2) > 0).all() and (np.diff(x, axis=(0)) == 0).all()
    assert (np.diff(y, axis=1) > 0).all() and (np.diff(t, axis=0) > 0).all()
    assert (np.diff(t, axis=2) == 0).all() and (np.diff(y, axis=2) == 0).all()


def test_model_condition_follows_the_models_input_channels():
    demo = WanConfig.preset("demo")
    assert demo.in_dim == 6 and demo.out_dim == 3
    np.testing.assert_array_equal(model_condition(demo), position_channels()[None])
    assert model_condition(demo.replace(in_dim=3)) is None
    with pytest.raises(ValueError, match="in_dim=5"):
        model_condition(demo.replace(in_dim=5))
