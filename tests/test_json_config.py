"""The one JSON round trip of the config dataclasses, on a toy config with a tuple field and a
nested object, and on every config class that uses it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fpsa_jax.config import WanConfig
from fpsa_jax.json_config import JsonConfig
from fpsa_jax.model.umt5 import UMT5Config
from fpsa_jax.model.vae import WanVAEConfig
from fpsa_jax.training import TrainConfig


@dataclasses.dataclass(frozen=True)
class Inner(JsonConfig):
    size: int = 1


@dataclasses.dataclass(frozen=True)
class Outer(JsonConfig):
    shape: tuple[int, ...] = (1, 2)
    inner: Inner | None = None
    name: str = "x"

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(self.shape))

    @classmethod
    def _from_json_fields(cls, fields):
        if isinstance(fields.get("inner"), dict):
            fields["inner"] = Inner.from_dict(fields["inner"])
        return fields


def test_tuples_become_lists_nested_objects_dicts_and_back():
    c = Outer(shape=(3, 4, 5), inner=Inner(7))
    assert c.to_dict() == {"shape": [3, 4, 5], "inner": {"size": 7}, "name": "x"}
    text = c.to_json()
    assert json.loads(text) == c.to_dict() and list(json.loads(text)) == sorted(c.to_dict())
    assert Outer.from_json(c.to_json()) == c and Outer.from_dict({"name": "y"}) == Outer(name="y")


@pytest.mark.parametrize(
    "config",
    [
        WanConfig.preset("tiny", patch_size=(1, 4, 4), linear_quant="fp8"),
        UMT5Config.preset("tiny"),
        WanVAEConfig.preset("tiny"),
        TrainConfig(grad_clip_norm=None),
        Outer(),
    ],
    ids=lambda c: type(c).__name__,
)
def test_every_config_round_trips_and_names_its_unknown_fields(config):
    back = type(config).from_json(config.to_json())
    assert back == config and hash(back) == hash(config)
    with pytest.raises(ValueError, match=rf"unknown {type(config).__name__} fields \['bogus'\]"):
        type(config).from_dict({**config.to_dict(), "bogus": 1})
