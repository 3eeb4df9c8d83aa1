"""UMT5Config: presets, validation messages that name the field, JSON round trip."""

from __future__ import annotations

import functools
import math

import jax
import pytest

from fpsa_jax.convert.umt5 import expected_shapes
from fpsa_jax.model.umt5 import UMT5Config, init_params


def test_umt5_xxl_preset_has_the_published_sizes():
    c = UMT5Config.preset("umt5-xxl")
    assert (c.vocab_size, c.d_model, c.d_ff, c.num_heads, c.d_kv, c.num_layers) == (
        256384,
        4096,
        10240,
        64,
        64,
        24,
    )
    assert (c.relative_attention_num_buckets, c.relative_attention_max_distance, c.eps) == (
        32,
        128,
        1e-6,
    )
    # About 5.7B parameters: 1.05B embedding + 24 layers of 4 * 4096^2 + 3 * 4096 * 10240.
    assert (
        c.num_params()
        == 256384 * 4096 + 24 * (4 * 4096**2 + 3 * 4096 * 10240 + 2 * 4096 + 32 * 64) + 4096
    )
    assert 5.6e9 < c.num_params() < 5.8e9


@pytest.mark.parametrize("name", ["umt5-xxl", "tiny"])
def test_json_round_trip(name):
    c = UMT5Config.preset(name, dtype="float32")
    assert UMT5Config.from_json(c.to_json()) == c


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown UMT5Config preset 'xl'.*'tiny'"):
        UMT5Config.preset("xl")


def test_unknown_json_field_is_named():
    with pytest.raises(ValueError, match=r"unknown UMT5Config fields \['dim'\]"):
        UMT5Config.from_dict({**UMT5Config.preset("tiny").to_dict(), "dim": 3})


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(d_model=0), "d_model must be a positive int"),
        (dict(num_layers=True), "num_layers must be a positive int"),
        (dict(relative_attention_num_buckets=7), "num_buckets must be even and >= 4"),
        (dict(relative_attention_max_distance=8), "max_distance must exceed"),
        (dict(eps=0.0), "eps must be > 0"),
        (dict(dtype="int8"), "dtype must be one of"),
        (dict(param_dtype="fp8"), "param_dtype must be one of"),
    ],
)
def test_invalid_values_name_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        UMT5Config.preset("tiny", **change)


def test_model_and_converter_agree_on_the_umt5_xxl_parameter_count():
    config = UMT5Config.preset("umt5-xxl")
    abstract = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    model_count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract))
    checkpoint_count = sum(math.prod(s) for s in expected_shapes(config).values())
    assert model_count == checkpoint_count == config.num_params()
