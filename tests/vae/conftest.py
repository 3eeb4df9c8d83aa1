"""A randomised tiny diffusers `AutoencoderKLWan`, saved in both checkpoint layouts."""

from __future__ import annotations

import re

import pytest
import torch

TINY = dict(
    base_dim=3,
    z_dim=16,
    dim_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
)


def random_wan_vae(seed: int = 0, **overrides):
    """The tiny diffusers VAE with every parameter perturbed: no zero bias, no unit gamma."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    model = AutoencoderKLWan(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model


def to_original_names(state: dict, num_res_blocks: int) -> dict:
    """Inverse of diffusers' Wan VAE renaming: a diffusers state dict in Wan2.1_VAE.pth names."""
    res = {
        "norm1": "residual.0",
        "conv1": "residual.2",
        "norm2": "residual.3",
        "conv2": "residual.6",
        "conv_shortcut": "shortcut",
    }
    per_level = num_res_blocks + 2  # decoder: res blocks + 1, then the upsampler

    def rename(k: str) -> str:
        if re.search(r"(down_blocks|resnets)\.", k):  # residual-block parts first
            k = re.sub(
                r"\.(norm1|conv1|norm2|conv2|conv_shortcut)\.", lambda m: f".{res[m[1]]}.", k
            )
        k = re.sub(r"^(encoder|decoder)\.conv_in\.", r"\1.conv1.", k)
        k = re.sub(r"^quant_conv\.", "conv1.", k)
        k = re.sub(r"^post_quant_conv\.", "conv2.", k)
        k = re.sub(r"\.norm_out\.", ".head.0.", k)
        k = re.sub(r"\.conv_out\.", ".head.2.", k)
        k = re.sub(r"\.mid_block\.resnets\.0\.", ".middle.0.", k)
        k = re.sub(r"\.mid_block\.attentions\.0\.", ".middle.1.", k)
        k = re.sub(r"\.mid_block\.resnets\.1\.", ".middle.2.", k)
        k = re.sub(r"^encoder\.down_blocks\.", "encoder.downsamples.", k)
        k = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
            lambda m: f"decoder.upsamples.{int(m[1]) * per_level + int(m[2])}.",
            k,
        )
        k = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.upsamples.{int(m[1]) * per_level + per_level - 1}.",
            k,
        )
        return k

    return {rename(k): v for k, v in state.items()}


@pytest.fixture(scope="session")
def torch_vae():
    return random_wan_vae()


@pytest.fixture(scope="session")
def diffusers_dir(torch_vae, tmp_path_factory):
    """A diffusers `vae/` folder: config.json + diffusion_pytorch_model.safetensors."""
    path = tmp_path_factory.mktemp("diffusers") / "vae"
    torch_vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def original_pth(torch_vae, tmp_path_factory):
    """The same weights as a Wan2.1_VAE.pth-style state dict."""
    path = tmp_path_factory.mktemp("original") / "Wan2.1_VAE.pth"
    torch.save(to_original_names(torch_vae.state_dict(), TINY["num_res_blocks"]), path)
    return path
