"""WanConfig: presets match the published parameter counts, JSON round trip, validation."""

import math

import flax.linen as nn
import jax
import pytest

from fpsa_jax.config import WanConfig
from fpsa_jax.model.wan import WanModel, _dummy_inputs


@pytest.mark.parametrize(
    "name,expected", [("t2v-1.3b", 1_418_996_800), ("t2v-14b", 14_288_491_584)]
)
def test_presets_have_the_published_parameter_count(name, expected):
    cfg = WanConfig.preset(name)
    shapes = jax.eval_shape(
        WanModel(cfg).init, jax.random.key(0), *_dummy_inputs(cfg, (1, 1, 2, 2))
    )
    counted = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes)))
    assert counted == expected
    assert cfg.num_params() == expected


def test_rope_split_of_a_128_head_is_44_42_42():
    assert WanConfig.preset("t2v-14b").rope_dims == (44, 42, 42)


def test_json_round_trip(tmp_path):
    cfg = WanConfig.preset("tiny", dtype="float32", remat="full", linear_quant="fp8")
    cfg.save(tmp_path / "c.json")
    assert WanConfig.load(tmp_path / "c.json") == cfg
    assert hash(cfg) == hash(WanConfig.from_json(cfg.to_json()))
    # A config written before linear_quant existed loads with float linears.
    older = {k: v for k, v in cfg.to_dict().items() if k != "linear_quant"}
    assert WanConfig.from_dict(older) == cfg.replace(linear_quant="none")


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"dim": 0}, "dim must be a positive int"),
        ({"num_heads": 5}, "divisible by num_heads"),
        ({"dim": 8, "num_heads": 2}, "head_dim"),
        ({"patch_size": (1, 2)}, "patch_size"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"remat": "sometimes"}, "remat must be one of"),
        ({"linear_quant": "int8"}, "WanConfig.linear_quant must be one of"),
        ({"eps": 0.0}, "eps"),
        ({"freq_dim": 7}, "freq_dim"),
    ],
)
def test_invalid_fields_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        WanConfig.preset("tiny", **changes)


def test_unknown_preset_and_unknown_json_field_are_rejected():
    with pytest.raises(ValueError, match="unknown WanConfig preset 'huge'.*t2v-1.3b"):
        WanConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown WanConfig fields"):
        WanConfig.from_dict({**WanConfig.preset("tiny").to_dict(), "depth": 3})
