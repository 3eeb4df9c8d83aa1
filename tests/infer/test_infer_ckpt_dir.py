"""`python -m infer --ckpt_dir=DIR` on a complete tiny Wan2.1 text-to-video directory, in the
original layout and in the diffusers one: random DiT, VAE and UMT5 encoder, and a tokenizer
trained by the tests (nothing is downloaded). The runs import only what the README's runtime
install provides (tests/runtime_env.py: no torch, transformers or diffusers); torch and
transformers only write the directories.

The DiT reads UMT5's output, so its text_dim is the encoder's d_model (16). 5 frames at 32*32
-> latents [1, 2, 4, 4, 16].
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from tests.convert.wan_state import make_original_state_dict
from tests.pipeline.conftest import DIT, tiny_diffusers_dit
from tests.runtime_env import run_module
from tests.umt5.conftest import random_umt5, save_tiny_tokenizer, to_wan_keys
from tests.vae.conftest import TINY as TINY_VAE
from tests.vae.conftest import random_wan_vae, to_original_names

# A runtime dependency, but the GPU image has none: skip there rather than fail collection.
imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")

TEXT_LEN = 32  # tokens per prompt (the tokenizer's max_length) in the original config.json
FLAGS = ("--size=32*32", "--frame_num=5", "--sample_steps=2", "--base_seed=3")
LATENTS = (1, 2, 4, 4, 16)


def write_model_dir(root, layout: str):
    """A complete Wan2.1 T2V directory at `root`; returns the tokenizer folder's path."""
    text_encoder = random_umt5(d_model=DIT["text_dim"])
    vae = random_wan_vae(seed=4)
    if layout == "diffusers":
        dit = tiny_diffusers_dit()
        dit.save_pretrained(root / "transformer")  # no text_len in its config: 512 tokens
        config = json.loads((root / "transformer" / "config.json").read_text())
        assert config["num_attention_heads"] == DIT["num_heads"]
        vae.save_pretrained(root / "vae")
        text_encoder.save_pretrained(root / "text_encoder")
        return save_tiny_tokenizer(root / "tokenizer")
    # The same DiT weights as tiny_diffusers_dit, under the original key names.
    root.mkdir()
    save_file(make_original_state_dict(DIT, seed=11), root / "diffusion_pytorch_model.safetensors")
    # The fields of Wan2.1-T2V-1.3B's config.json (no text_dim: it is read off the weights).
    config = dict(_class_name="WanModel", model_type="t2v", text_len=TEXT_LEN, eps=1e-6)
    config |= {k: DIT[k] for k in ("dim", "ffn_dim", "freq_dim", "in_dim", "out_dim")}
    config |= {k: DIT[k] for k in ("num_heads", "num_layers")}
    (root / "config.json").write_text(json.dumps(config))
    vae_state = to_original_names(vae.state_dict(), TINY_VAE["num_res_blocks"])
    torch.save(vae_state, root / "Wan2.1_VAE.pth")
    encoder_state = to_wan_keys(text_encoder.state_dict())
    torch.save(
        {k: v.to(torch.bfloat16) for k, v in encoder_state.items()},
        root / "models_t5_umt5-xxl-enc-bf16.pth",
    )
    return save_tiny_tokenizer(root / "google" / "umt5-xxl")


def _run(model_dir, tmp_path, name, prompt):
    video, latents = tmp_path / f"{name}.mp4", tmp_path / f"{name}.npy"
    result = run_module(
        "infer",
        f"--ckpt_dir={model_dir}",
        *FLAGS,
        f"--prompt={prompt}",
        f"--save_file={video}",
        f"--save_latents={latents}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result, video, np.load(latents)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_infer_runs_a_real_model_directory(tmp_path, layout):
    model_dir = tmp_path / "model"
    tokenizer = write_model_dir(model_dir, layout)

    # Three runs at once (each is mostly single-threaded start-up and compilation).
    # The second prompt cleans to the first (Wan collapses whitespace before tokenizing).
    runs = [("red", "a red square"), ("red_again", " a  red\tsquare "), ("dog", "the dog runs")]
    with ThreadPoolExecutor(len(runs)) as pool:
        (result, video, z), (_, _, z_again), (_, _, z_other) = pool.map(
            lambda run: _run(model_dir, tmp_path, *run), runs
        )
    assert "time per phase" in result.stdout and "text encoding" in result.stdout
    assert f"wrote 5 frames at 16 fps to {video}" in result.stdout
    reader = imageio_ffmpeg.read_frames(str(video))
    assert next(reader)["size"] == (32, 32) and len(list(reader)) == 5
    assert z.shape == LATENTS and np.isfinite(z).all() and z.std() > 0
    # The prompt goes through the tokenizer and UMT5: the same tokens give the same latents (the
    # stand-in embeddings of a model without an encoder hash the raw string), other words others.
    np.testing.assert_array_equal(z_again, z)
    assert np.abs(z_other - z).max() > 1e-3

    shutil.rmtree(tokenizer)
    broken = run_module("infer", f"--ckpt_dir={model_dir}", *FLAGS, cwd=tmp_path)
    assert broken.returncode != 0
    assert f"missing: {tokenizer}" in broken.stderr


def _last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def test_missing_packages_are_named_before_any_weight_loads(tmp_path):
    """Before: the ImportError for the tokenizer came after the DiT, VAE and UMT5 had loaded
    (minutes at 14B). The DiT file is made unreadable here: the run must stop at the check."""
    model_dir = tmp_path / "model"
    tokenizer = write_model_dir(model_dir, "original")
    (model_dir / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 16)
    result = run_module(
        "infer", f"--ckpt_dir={model_dir}", *FLAGS, cwd=tmp_path, block=("tokenizers",)
    )
    assert result.returncode == 1
    assert _last_line(result) == (
        f"error: --ckpt_dir {model_dir}: loading this model needs tokenizers for "
        f"{tokenizer / 'tokenizer.json'} (pip install tokenizers)"
    )
    assert "Traceback" not in result.stderr

    # A .pth in torch's legacy (pre-zip) format is the one thing that needs torch.
    vae = model_dir / "Wan2.1_VAE.pth"
    torch.save(torch.load(vae), vae, _use_new_zipfile_serialization=False)
    result = run_module("infer", f"--ckpt_dir={model_dir}", *FLAGS, cwd=tmp_path)
    assert _last_line(result) == (
        f"error: --ckpt_dir {model_dir}: loading this model needs torch for {vae} "
        "(pip install 'fpsa-jax[convert]')"
    )
