"""Synthetic clips: deterministic, the shape moves and is coloured as its caption says; the
stand-in encoder and SyntheticLatentSource."""

import dataclasses
import json

import numpy as np
import pytest

from fpsa_jax.data import (
    DIRECTIONS,
    PALETTE,
    SHAPES,
    SPEEDS,
    StandInEncoder,
    SyntheticLatentSource,
    clip_attributes,
    render,
    render_many,
    synthetic_clip,
)
from fpsa_jax.data.synthetic import BACKGROUND

F, H, W = 9, 48, 64


def _shape_pixels(frame):
    """Boolean [H, W]: pixels clearly off the background."""
    background = np.asarray(BACKGROUND) * 2 - 1
    return np.abs(frame - background).max(axis=-1) > 0.5


def _centroid(frame):
    ys, xs = np.nonzero(_shape_pixels(frame))
    return np.array([xs.mean(), ys.mean()])


def test_clips_are_deterministic_in_seed_and_index():
    a, caption_a, attrs_a = synthetic_clip(3, 7, F, H, W)
    b, caption_b, attrs_b = synthetic_clip(3, 7, F, H, W)
    np.testing.assert_array_equal(a, b)
    assert (caption_a, attrs_a) == (caption_b, attrs_b)
    assert a.dtype == np.float32 and a.shape == (F, H, W, 3)
    assert -1 <= a.min() and a.max() <= 1
    others = [synthetic_clip(s, i, F, H, W)[0] for s, i in ((3, 8), (4, 7))]
    assert all(not np.array_equal(a, o) for o in others)


@pytest.mark.parametrize("index", range(24))
def test_shape_moves_in_the_captioned_direction_with_the_captioned_colour(index):
    video, caption, attrs = synthetic_clip(0, index, F, H, W)
    assert caption == (
        f"a {attrs.colour} {attrs.shape} moves {attrs.direction} "
        f"{'slowly' if attrs.speed == 'slow' else 'quickly'}"
    )
    step = _centroid(video[-1]) - _centroid(video[0])
    dx, dy = DIRECTIONS[attrs.direction]
    along, across = (step[0] * dx, step[1]) if dx else (step[1] * dy, step[0])
    extent = W if dx else H
    assert along == pytest.approx(SPEEDS[attrs.speed] * extent, rel=0.1)
    assert abs(across) < 0.5
    # The colour inside the shape is the named colour, nearer to it than to any other.
    frame = video[F // 2]
    mean = (np.median(frame[_shape_pixels(frame)], axis=0) + 1) / 2
    nearest = min(PALETTE, key=lambda c: np.linalg.norm(mean - np.asarray(PALETTE[c])))
    assert nearest == attrs.colour
    np.testing.assert_allclose(mean, PALETTE[attrs.colour], atol=0.02)


def test_every_attribute_value_occurs():
    attrs = [clip_attributes(0, i, H, W) for i in range(200)]
    assert {a.shape for a in attrs} == set(SHAPES)
    assert {a.colour for a in attrs} == set(PALETTE)
    assert {a.direction for a in attrs} == set(DIRECTIONS)
    assert {a.speed for a in attrs} == set(SPEEDS)


def test_shapes_differ_in_area():
    base = clip_attributes(0, 0, H, W)
    areas = {
        s: _shape_pixels(render(dataclasses.replace(base, shape=s), 1, H, W)[0]).sum()
        for s in SHAPES
    }
    assert areas["triangle"] < areas["circle"] and areas["triangle"] < areas["square"]


@pytest.mark.parametrize(
    "args,message",
    [
        ((0, 0, 0, H, W), "frames must be a positive int"),
        ((0, 0, F, 4, W), "at least 8x8"),
        ((0, -1, F, H, W), "index must be >= 0"),
    ],
)
def test_bad_clip_requests_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        synthetic_clip(*args)


def test_render_refuses_unknown_attributes():
    attrs = clip_attributes(0, 0, H, W)
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        render(dataclasses.replace(attrs, shape="hexagon"), 1, H, W)
    with pytest.raises(ValueError, match="unknown colour 'teal'"):
        render(dataclasses.replace(attrs, colour="teal"), 1, H, W)


def test_standin_encoder_pools_and_projects():
    encoder = StandInEncoder(text_dim=8)
    video, caption, _ = synthetic_clip(1, 2, F, H, W)
    latent = encoder.encode_video(video)
    assert latent.shape == (3, H // 8, W // 8, 16) and latent.dtype == np.float32
    # Independent reference: frame 1 alone, then means of 4 frames, 8x8 means, projection.
    groups = [video[:1].mean(0), video[1:5].mean(0), video[5:9].mean(0)]
    for f, g in enumerate(groups):
        cell = g[8:16, 16:24].reshape(-1, 3).mean(0)
        np.testing.assert_allclose(latent[f, 1, 2], cell @ encoder.projection, atol=1e-5)
    text = encoder.encode_text(caption)
    assert text.shape == (len(caption.split()) + 1, 8)
    np.testing.assert_array_equal(text, StandInEncoder(text_dim=8).encode_text(caption.upper()))
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        encoder.encode_video(video[:4])
    with pytest.raises(ValueError, match="text_dim must be a positive int"):
        StandInEncoder(text_dim=0)


def _source(**kw):
    return SyntheticLatentSource(
        2, frames=5, height=16, width=16, text_len=12, encoder=StandInEncoder(text_dim=4), **kw
    )


def test_synthetic_source_is_fixed_shape_host_disjoint_and_resumable():
    b = next(_source())
    assert b.latents.shape == (2, 2, 2, 2, 16) and b.context.shape == (2, 12, 4)
    assert (b.context[0, b.context_lengths[0] :] == 0).all()
    hosts = [_source(process_index=p, process_count=2) for p in range(2)]
    ids = [np.concatenate([next(h).example_ids for _ in range(3)]) for h in hosts]
    assert set(ids[0]).isdisjoint(ids[1]) and set(ids[0]) | set(ids[1]) == set(range(12))
    source = _source(seed=5)
    next(source)
    state = json.loads(json.dumps(source.state()))
    expected = next(source)
    resumed = next(_source(seed=5, state=state))
    np.testing.assert_array_equal(resumed.latents, expected.latents)
    assert resumed.captions == expected.captions
    with pytest.raises(ValueError, match="seed is 5 in the state, 0 here"):
        _source(state=state)


def _reference_video(attrs, frames, height, width):
    """Pixel by pixel: the fraction of the 2 x 2 sub-pixel samples inside the shape (the shapes'
    definitions written out again), blended from the background to the colour, in float64."""
    background = np.asarray(BACKGROUND) * 2 - 1
    colour = np.asarray(PALETTE[attrs.colour]) * 2 - 1
    r = attrs.radius
    video = np.empty((frames, height, width, 3))
    for f in range(frames):
        t = f / max(frames - 1, 1)
        cx = attrs.start[0] + t * (attrs.end[0] - attrs.start[0])
        cy = attrs.start[1] + t * (attrs.end[1] - attrs.start[1])
        for y in range(height):
            for x in range(width):
                hits = 0
                for sy in (0.25, 0.75):
                    for sx in (0.25, 0.75):
                        dx, dy = x + sx - cx, y + sy - cy
                        if attrs.shape == "circle":
                            hits += dx * dx + dy * dy <= r * r
                        elif attrs.shape == "square":
                            hits += max(abs(dx), abs(dy)) <= 0.886 * r
                        else:  # triangle: apex (0, -r), base y = 0.8 r from x = -r to r
                            hits += dy <= 0.8 * r and abs(dx) <= (dy + r) / 1.8
                video[f, y, x] = background + hits / 4 * (colour - background)
    return video


def test_render_many_matches_a_pixel_by_pixel_rasterizer_at_odd_sizes_and_off_frame():
    size = (3, 13, 22)  # odd sizes; clips placed for a larger frame run off this one
    clips = [clip_attributes(11, i, 20, 30) for i in range(6)]
    clips[1] = dataclasses.replace(clips[1], start=(-6.0, 4.0), end=(40.0, 30.0))  # crosses out
    clips[2] = dataclasses.replace(clips[2], radius=7.3)  # radii differ within one call
    videos = render_many(clips, *size)
    assert videos.shape == (6, *size, 3) and videos.dtype == np.float32
    for attrs, video in zip(clips, videos, strict=True):
        np.testing.assert_allclose(video, _reference_video(attrs, *size), atol=1e-6)
        np.testing.assert_array_equal(render(attrs, *size), video)  # render is one of many


def test_render_many_refuses_an_empty_list():
    with pytest.raises(ValueError, match="at least one clip"):
        render_many([], 9, 32, 32)
