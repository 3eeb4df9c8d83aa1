"""Bad inputs and bad configs are rejected with messages that say why; configs round-trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from fpsa_jax.model.vae import VAE_PRESETS, WanVAEConfig, decode, encode, init_params

TINY = WanVAEConfig.preset("tiny")


@pytest.fixture(scope="module")
def params():
    # Inputs are checked before any compute, so zeros of the right shapes do (and skip the
    # slow compilation of `init_params`).
    shapes = jax.eval_shape(lambda k: init_params(TINY, k), jax.random.key(0))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 5, 16, 16, 4), "must have 3 channels"),
        ((1, 4, 16, 16, 3), "1 \\+ 4k"),
        ((1, 6, 16, 16, 3), "got F = 6"),
        ((1, 5, 12, 16, 3), "multiples of 8"),
        ((1, 5, 16, 20, 3), "W = 20"),
        ((5, 16, 16, 3), "5-D"),
        ((1, 0, 16, 16, 3), "non-empty"),
    ],
)
def test_encode_rejects_bad_video(params, shape, message):
    with pytest.raises(ValueError, match=message):
        encode(TINY, params, jnp.zeros(shape))


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 2, 2, 2, 4), "z_dim = 16 channels"),
        ((2, 2, 2, 16), "5-D"),
    ],
)
def test_decode_rejects_bad_latents(params, shape, message):
    with pytest.raises(ValueError, match=message):
        decode(TINY, params, jnp.zeros(shape))


def test_wan21_preset_has_the_reference_size():
    cfg = WanVAEConfig.preset("wan2.1")
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    count = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
    assert round(count / 1e6, 1) == 126.9
    assert (cfg.temporal_factor, cfg.spatial_factor, cfg.z_dim) == (4, 8, 16)


@pytest.mark.parametrize("name", sorted(VAE_PRESETS))
def test_config_round_trips_through_json(name):
    cfg = WanVAEConfig.preset(name)
    assert WanVAEConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(base_dim=0), "base_dim"),
        (dict(num_res_blocks=True), "num_res_blocks"),
        (dict(dim_mult=()), "dim_mult"),
        (dict(temporal_downsample=(True,)), "temporal_downsample"),
        (dict(latents_mean=(0.0,)), "latents_mean"),
        (dict(latents_std=(0.0,) * 16), "latents_std must be positive"),
    ],
)
def test_config_rejects_bad_fields(changes, message):
    with pytest.raises(ValueError, match=message):
        WanVAEConfig.preset("tiny", **changes)


def test_config_rejects_unknown_preset_and_fields():
    with pytest.raises(ValueError, match="valid: \\['tiny', 'wan2.1'\\]"):
        WanVAEConfig.preset("wan2.2")
    with pytest.raises(ValueError, match="unknown WanVAEConfig fields \\['patch_size'\\]"):
        WanVAEConfig.from_dict({"patch_size": 2})
