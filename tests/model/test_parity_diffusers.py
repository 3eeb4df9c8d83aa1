"""WanModel against diffusers' WanTransformer3DModel (PyTorch, CPU, float32) with the same random
weights, loaded through our converter from the original layout, the diffusers layout and a sharded
diffusers checkpoint. Acceptance: max |ours - ref| / max |ref| <= 1e-5."""

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

from fpsa_jax.convert import load_wan_checkpoint
from fpsa_jax.model.wan import WanModel
from tests.convert.wan_state import TINY, diffusers_model, make_original_state_dict

TEXT_LEN = 512  # what the converted config uses; diffusers gets the zero-padded context


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One set of random weights (head included), written in three ways, plus diffusers' model."""
    root = tmp_path_factory.mktemp("wan")
    original = make_original_state_dict(TINY, seed=3)
    model = diffusers_model(TINY, original)
    assert float(model.proj_out.weight.detach().abs().min()) > 0  # non-zero output projection

    safetensors.numpy.save_file(original, str(root / "original.safetensors"))
    model.save_pretrained(root / "diffusers")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    assert list((root / "sharded").glob("*.safetensors.index.json"))
    return {
        "original": root / "original.safetensors",
        "diffusers": root / "diffusers",
        "sharded": root / "sharded",
    }, model


def _inputs(seed=0, b=2, f=3, h=10, w=14, lt=7):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((b, f, h, w, 4)).astype(np.float32)
    timesteps = np.array([937.0, 41.0], np.float32)[:b]
    context = rng.standard_normal((b, lt, 16)).astype(np.float32)
    return latents, timesteps, context


def _diffusers_forward(model, latents, timesteps, context):
    padded = np.concatenate(
        [context, np.zeros((context.shape[0], TEXT_LEN - context.shape[1], 16), np.float32)], 1
    )
    with torch.no_grad():
        out = model(
            torch.from_numpy(latents.transpose(0, 4, 1, 2, 3)),
            torch.from_numpy(timesteps),
            torch.from_numpy(padded),
            return_dict=False,
        )[0]
    return out.numpy().transpose(0, 2, 3, 4, 1)


@pytest.mark.parametrize("layout", ["original", "diffusers", "sharded"])
def test_forward_matches_diffusers(checkpoints, layout):
    paths, model = checkpoints
    config, params = load_wan_checkpoint(paths[layout], dtype=np.float32, num_heads=2)
    config = config.replace(dtype="float32")
    assert config.text_len == TEXT_LEN and config.num_heads == 2
    latents, timesteps, context = _inputs()
    ref = _diffusers_forward(model, latents, timesteps, context)
    out = np.asarray(
        jax.jit(WanModel(config).apply)({"params": params}, latents, timesteps, context)
    )
    assert out.shape == ref.shape == (2, 3, 10, 14, 4)
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert rel <= 1e-5, f"max |diff| / max |ref| = {rel:.2e}"


def test_single_frame_odd_grid_matches_diffusers(checkpoints):
    paths, model = checkpoints
    config, params = load_wan_checkpoint(paths["original"], dtype=np.float32, num_heads=2)
    config = config.replace(dtype="float32")
    latents, timesteps, context = _inputs(seed=5, b=1, f=1, h=6, w=18, lt=3)
    ref = _diffusers_forward(model, latents, timesteps, context)
    out = np.asarray(WanModel(config).apply({"params": params}, latents, timesteps, context))
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5
