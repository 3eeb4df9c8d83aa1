"""The analytic evaluator reads back every attribute of the generator's own clips, and fails the
way it should on corrupted ones."""

import dataclasses

import numpy as np
import pytest

from fpsa_jax.data.synthetic import BACKGROUND, render
from fpsa_jax.demo.evaluate import (
    ATTRIBUTES,
    attribute_accuracy,
    chance_accuracy,
    read_attributes,
)
from fpsa_jax.demo.task import FRAMES, HEIGHT, WIDTH, held_out_attributes, train_attributes

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def _clips(n):
    return [train_attributes(5, i) for i in range(n)] + held_out_attributes()


def test_ground_truth_clips_are_read_back_perfectly():
    targets = _clips(60)
    measured = [read_attributes(render(a, FRAMES, HEIGHT, WIDTH)) for a in targets]
    assert attribute_accuracy(measured, targets) == {a: 1.0 for a in (*ATTRIBUTES, "all")}


@pytest.mark.parametrize("size", [(9, 48, 64), (17, 64, 64)])
def test_other_clip_sizes_are_read_back_too(size):
    f, h, w = size
    from fpsa_jax.data.synthetic import clip_attributes

    targets = [clip_attributes(1, i, h, w) for i in range(12)]
    measured = [read_attributes(render(a, f, h, w)) for a in targets]
    assert attribute_accuracy(measured, targets)["all"] == 1.0


def test_mild_pixel_noise_does_not_change_the_reading():
    rng = np.random.default_rng(0)
    targets = _clips(12)
    noisy = [render(a, FRAMES, HEIGHT, WIDTH) for a in targets]
    noisy = [np.clip(v + 0.1 * rng.standard_normal(v.shape), -1, 1) for v in noisy]
    measured = [read_attributes(v) for v in noisy]
    assert attribute_accuracy(measured, targets)["all"] == 1.0


def test_reversed_time_reverses_the_direction_and_keeps_the_rest():
    for attrs in _clips(8):
        video = render(attrs, FRAMES, HEIGHT, WIDTH)[::-1]
        m = read_attributes(video)
        assert m.direction == OPPOSITE[attrs.direction]
        assert (m.colour, m.shape, m.speed) == (attrs.colour, attrs.shape, attrs.speed)


def test_a_recoloured_or_reshaped_clip_is_read_as_what_it_shows():
    attrs = train_attributes(0, 3)
    other_colour = "blue" if attrs.colour != "blue" else "red"
    other_shape = "circle" if attrs.shape != "circle" else "square"
    for changed in (
        dataclasses.replace(attrs, colour=other_colour),
        dataclasses.replace(attrs, shape=other_shape),
    ):
        m = read_attributes(render(changed, FRAMES, HEIGHT, WIDTH))
        assert (m.colour, m.shape) == (changed.colour, changed.shape)


def test_a_static_shape_moves_slowly_and_a_blank_video_has_no_attributes():
    attrs = train_attributes(0, 1)
    still = dataclasses.replace(attrs, end=attrs.start)
    m = read_attributes(render(still, FRAMES, HEIGHT, WIDTH))
    assert m.speed == "slow" and abs(m.displacement[0]) + abs(m.displacement[1]) < 0.5
    blank = np.broadcast_to(np.asarray(BACKGROUND, np.float32) * 2 - 1, (FRAMES, 32, 32, 3))
    assert read_attributes(blank).as_dict() == {a: "none" for a in ATTRIBUTES}


def test_a_shape_visible_in_one_frame_only_has_no_motion():
    video = render(train_attributes(0, 2), FRAMES, HEIGHT, WIDTH)
    video[1:] = np.asarray(BACKGROUND, np.float32) * 2 - 1
    m = read_attributes(video)
    assert m.colour != "none" and m.direction == "none" and m.frames_used == 1


def test_accuracy_counts_per_attribute_and_all_four():
    targets = _clips(0)[:4]
    measured = [read_attributes(render(a, FRAMES, HEIGHT, WIDTH)) for a in targets]
    measured[0] = dataclasses.replace(measured[0], colour="none")
    measured[1] = dataclasses.replace(measured[1], shape="none", speed="none")
    acc = attribute_accuracy(measured, targets)
    assert acc == {"colour": 0.75, "shape": 0.75, "direction": 1.0, "speed": 0.75, "all": 0.5}
    assert chance_accuracy()["colour"] == pytest.approx(1 / 6)
    assert chance_accuracy()["all"] == pytest.approx(1 / (6 * 3 * 4 * 2))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"video must be \[F, H, W, 3\]"):
        read_attributes(np.zeros((9, 32, 32)))
    with pytest.raises(ValueError, match="need as many measurements as targets"):
        attribute_accuracy([], [])
