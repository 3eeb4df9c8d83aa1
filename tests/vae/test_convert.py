"""Checkpoint conversion: layout detection, name tables, and every error branch."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import pytest
import torch

from fpsa_jax.convert.errors import CheckpointError, CheckpointNotFoundError
from fpsa_jax.convert.vae import load_wan_vae, vae_keys
from fpsa_jax.model.vae import WanVAEConfig
from tests.vae.conftest import TINY, random_wan_vae, to_original_names


@pytest.fixture(scope="module")
def original_state(torch_vae):
    return to_original_names(torch_vae.state_dict(), TINY["num_res_blocks"])


def _save(state: dict, tmp_path) -> str:
    path = tmp_path / "vae.pth"
    torch.save(state, path)
    return path


def test_original_names_agree_with_diffusers_single_file_converter():
    # diffusers' converter hard-codes Wan2.1's block layout (2 res blocks, channel changes where
    # dim_mult [1, 2, 4, 4] has them), so check the table on a narrow model of that layout.
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    model = random_wan_vae(base_dim=2, dim_mult=[1, 2, 4, 4], num_res_blocks=2)
    config = WanVAEConfig.preset("wan2.1", base_dim=2)
    table = vae_keys(config)
    original = {e.original: model.state_dict()[e.diffusers] for e in table}
    assert set(convert_wan_vae_to_diffusers(original)) == set(model.state_dict())
    assert {e.diffusers for e in table} == set(model.state_dict())


def test_pipeline_root_and_bfloat16(diffusers_dir, tmp_path):
    root = tmp_path / "pipeline"
    shutil.copytree(diffusers_dir, root / "vae")
    config, params = load_wan_vae(root, dtype=jnp.bfloat16)
    assert config == WanVAEConfig.preset("tiny")
    assert params["decoder"]["conv_in"]["kernel"].dtype == jnp.bfloat16


def test_missing_path_is_reported(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_wan_vae(tmp_path / "nope.pth")


def test_unknown_layout_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match="not a Wan VAE checkpoint.*'w'"):
        load_wan_vae(_save({"w": torch.zeros(2)}, tmp_path))


def test_missing_and_unexpected_keys_are_named(original_state, tmp_path):
    state = dict(original_state)
    del state["decoder.middle.1.proj.bias"]
    state["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(
        CheckpointError,
        match="1 missing: 'decoder.middle.1.proj.bias'; 1 unexpected: 'decoder.extra.weight'",
    ):
        load_wan_vae(_save(state, tmp_path))


def test_wrong_shape_is_named(original_state, tmp_path):
    state = dict(original_state)
    state["decoder.middle.1.to_qkv.weight"] = torch.zeros(9, 3, 1, 1, 1)
    with pytest.raises(
        CheckpointError,
        match="'decoder.middle.1.to_qkv.weight' has shape "
        "\\(9, 3, 1, 1, 1\\), expected \\(9, 3, 1, 1\\)",
    ):
        load_wan_vae(_save(state, tmp_path))


def test_missing_post_quant_conv_is_reported(original_state, tmp_path):
    state = {k: v for k, v in original_state.items() if not k.startswith("conv2.")}
    with pytest.raises(CheckpointError, match="no 'conv2.weight'"):
        load_wan_vae(_save(state, tmp_path))


def test_unreadable_encoder_entry_is_reported(original_state, tmp_path):
    state = {
        k: v
        for k, v in original_state.items()
        if not k.startswith("encoder.downsamples.0.residual.6.")
    }
    with pytest.raises(CheckpointError, match="'encoder.downsamples.0' is neither"):
        load_wan_vae(_save(state, tmp_path))


def test_uneven_encoder_levels_are_reported(original_state, tmp_path):
    # Drop the last level's only residual block: levels then have 1, 1, 1, 0 blocks.
    state = {k: v for k, v in original_state.items() if not k.startswith("encoder.downsamples.6.")}
    with pytest.raises(CheckpointError, match="blocks per level \\[1, 1, 1, 0\\]"):
        load_wan_vae(_save(state, tmp_path))


def _with_config(diffusers_dir, tmp_path, **changes):
    path = tmp_path / "vae"
    shutil.copytree(diffusers_dir, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(is_residual=True), "is_residual = True: only the Wan2.1 VAE"),
        (dict(patch_size=2), "patch_size = 2"),
        (dict(base_dim=4), "base_dim = 4 but the tensors have 3"),
        (dict(temperal_downsample=[True, True, False]), "temperal_downsample"),
        (dict(decoder_base_dim=6), "decoder_base_dim = 6"),
        (dict(latents_std=[1.0] * 15), "invalid WanVAEConfig.*latents_std needs z_dim = 16"),
    ],
)
def test_config_json_disagreements_are_reported(diffusers_dir, tmp_path, changes, message):
    with pytest.raises(CheckpointError, match=message):
        load_wan_vae(_with_config(diffusers_dir, tmp_path, **changes))


def test_config_json_latent_statistics_are_used(diffusers_dir, tmp_path):
    config, _ = load_wan_vae(_with_config(diffusers_dir, tmp_path, latents_std=[2.0] * 16))
    assert config.latents_std == (2.0,) * 16


def test_a_dit_config_json_beside_the_original_pth_is_ignored(original_state, tmp_path):
    # An original Wan2.1 directory keeps the DiT's config.json next to Wan2.1_VAE.pth.
    path = _save(original_state, tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"_class_name": "WanModel", "patch_size": [1, 2, 2], "in_dim": 16})
    )
    config, _ = load_wan_vae(path)
    assert config.z_dim == TINY["z_dim"]
