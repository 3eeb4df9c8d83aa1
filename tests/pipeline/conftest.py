"""A tiny Wan2.1 text-to-video model in diffusers' layout (random DiT + random VAE), the same
weights converted by our loaders, and the shared inputs of one request.

Sizes: 9 frames at 48*32 (width*height) -> latents [B, 3, 4, 6, 16] -> DiT token grid (3, 2, 3).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fpsa_jax.convert import T2VWeights, load_wan_checkpoint
from fpsa_jax.convert.vae import load_wan_vae
from fpsa_jax.pipeline import latent_shape
from tests.convert.wan_state import TINY, diffusers_model, make_original_state_dict
from tests.vae.conftest import random_wan_vae

DIT = {**TINY, "in_dim": 16, "out_dim": 16}  # the tests' tiny DiT on 16 VAE latent channels
TEXT_LEN = 512  # the converted config's text_len: diffusers gets contexts zero-padded to it
BATCH, WIDTH, HEIGHT, FRAMES = 2, 48, 32, 9
PROMPT_LEN, NEGATIVE_LEN = 7, 5


def tiny_diffusers_dit():
    """diffusers' WanTransformer3DModel of the tiny config with every parameter random and
    non-zero (output projection included), from `make_original_state_dict`."""
    model = diffusers_model(DIT, make_original_state_dict(DIT, seed=11))
    assert float(model.proj_out.weight.detach().abs().min()) > 0
    return model


@dataclasses.dataclass(frozen=True)
class TinyModel:
    """The diffusers modules and our converted weights of one tiny model directory."""

    dit: torch.nn.Module
    vae: torch.nn.Module
    weights: T2VWeights


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> TinyModel:
    root = tmp_path_factory.mktemp("wan_t2v_diffusers")
    dit, vae = tiny_diffusers_dit(), random_wan_vae(seed=4)
    dit.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    dit_config, dit_params = load_wan_checkpoint(root, dtype=np.float32, num_heads=2)
    vae_config, vae_params = load_wan_vae(root)
    assert dit_config.text_len == TEXT_LEN
    weights = T2VWeights(dit_config.replace(dtype="float32"), dit_params, vae_config, vae_params)
    return TinyModel(dit, vae, weights)


@dataclasses.dataclass(frozen=True)
class Request:
    """Channels-last noise [B, f, h, w, 16] and embeddings [B, Lt, 16] of the prompt and of the
    negative prompt (of different lengths)."""

    noise: np.ndarray
    context: np.ndarray
    negative_context: np.ndarray


@pytest.fixture(scope="session")
def request_inputs() -> Request:
    rng = np.random.default_rng(2024)
    noise = rng.standard_normal(latent_shape(BATCH, WIDTH, HEIGHT, FRAMES)).astype(np.float32)
    context = rng.standard_normal((BATCH, PROMPT_LEN, 16)).astype(np.float32)
    negative = rng.standard_normal((BATCH, NEGATIVE_LEN, 16)).astype(np.float32)
    return Request(noise, context, negative)
