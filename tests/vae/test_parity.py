"""Encode / decode equal diffusers' AutoencoderKLWan (float32, CPU) through both layouts."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fpsa_jax.convert.vae import load_wan_vae
from fpsa_jax.model.vae import WanVAEConfig, decode, encode

RTOL = 1e-5  # max |ours - reference| / max |reference|


def _rel(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def _stats(config: WanVAEConfig):
    mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
    return mean, std


def _cl(t: torch.Tensor) -> np.ndarray:
    """torch [B, C, F, H, W] -> numpy channels-last [B, F, H, W, C]."""
    return t.permute(0, 2, 3, 4, 1).numpy()


@pytest.fixture(scope="module", params=["diffusers", "original"])
def loaded(request, diffusers_dir, original_pth):
    return load_wan_vae(diffusers_dir if request.param == "diffusers" else original_pth)


def test_layouts_give_the_same_params(diffusers_dir, original_pth):
    cfg_d, p_d = load_wan_vae(diffusers_dir)
    cfg_o, p_o = load_wan_vae(original_pth)
    assert cfg_d == cfg_o == WanVAEConfig.preset("tiny")
    flat_d, flat_o = (dict(jnp_tree_items(p)) for p in (p_d, p_o))
    assert flat_d.keys() == flat_o.keys()
    for k in flat_d:
        np.testing.assert_array_equal(flat_d[k], flat_o[k], err_msg=str(k))


def jnp_tree_items(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from jnp_tree_items(v, (*prefix, k))
        else:
            yield (*prefix, k), v


@pytest.mark.parametrize("frames", [9, 1])
def test_encode_matches_diffusers_latent_mean(torch_vae, loaded, frames):
    config, params = loaded
    torch.manual_seed(frames)
    video = torch.rand(2, 3, frames, 24, 40) * 2 - 1
    mean, std = _stats(config)
    with torch.no_grad():
        ref = _cl((torch_vae.encode(video).latent_dist.mean - mean) / std)
    ours = encode(config, params, jnp.asarray(_cl(video)))
    assert ours.shape == ref.shape == (2, 1 + (frames - 1) // 4, 3, 5, 16)
    assert _rel(ours, ref) <= RTOL


@pytest.mark.parametrize("latent_frames", [3, 1])
def test_decode_matches_diffusers(torch_vae, loaded, latent_frames):
    config, params = loaded
    torch.manual_seed(latent_frames)
    latents = torch.randn(2, 16, latent_frames, 3, 5)
    mean, std = _stats(config)
    with torch.no_grad():
        ref = _cl(torch_vae.decode(latents * std + mean).sample)
    # A reference that is mostly clipped would hide errors.
    assert (np.abs(ref) < 1).mean() > 0.5
    ours = decode(config, params, jnp.asarray(_cl(latents)))
    assert ours.shape == ref.shape == (2, 1 + 4 * (latent_frames - 1), 24, 40, 3)
    assert _rel(ours, ref) <= RTOL


# Same shapes as the parity tests above, so the chunked side reuses their compilation.
def test_frame_by_frame_decode_equals_whole_sequence(diffusers_dir):
    config, params = load_wan_vae(diffusers_dir)
    latents = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 3, 5, 16)), jnp.float32)
    chunked = decode(config, params, latents)
    whole = decode(config, params, latents, chunked=False)
    assert _rel(chunked, np.asarray(whole)) <= RTOL


def test_chunked_encode_equals_whole_sequence(diffusers_dir):
    config, params = load_wan_vae(diffusers_dir)
    video = np.random.default_rng(1).uniform(-1, 1, (2, 9, 24, 40, 3)).astype(np.float32)
    chunked = encode(config, params, jnp.asarray(video))
    whole = encode(config, params, jnp.asarray(video), chunked=False)
    assert _rel(chunked, np.asarray(whole)) <= RTOL
