"""A Wan2.1 text-to-video model directory -> the weights of every part (`T2VWeights`).

Finds the DiT, VAE, UMT5 encoder and tokenizer in the original layout or the diffusers one and
loads each with its converter; `fpsa_jax.pipeline` runs text to video on the result, and
`fpsa_jax.data.encoders` precomputes training records with it. `with_fp8_linears` quantizes the
DiT's block linears of loaded weights once (`WanConfig.linear_quant="fp8"`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from fpsa_jax.config import WanConfig
from fpsa_jax.convert.checkpoint import load_wan_checkpoint
from fpsa_jax.convert.umt5 import load_umt5
from fpsa_jax.convert.vae import load_wan_vae
from fpsa_jax.model.fp8_linear import quantize_linear_weights
from fpsa_jax.model.umt5 import Tokenizer, UMT5Config
from fpsa_jax.model.vae import WanVAEConfig


@dataclasses.dataclass(frozen=True)
class T2VWeights:
    """Everything a text-to-video run needs. The text encoder is optional: without it callers
    pass embeddings themselves."""

    dit_config: WanConfig
    dit_params: Any
    vae_config: WanVAEConfig
    vae_params: Any
    text_config: UMT5Config | None = None
    text_params: Any = None
    tokenizer: Tokenizer | None = None


def with_fp8_linears(weights: T2VWeights) -> T2VWeights:
    """`weights` whose DiT runs its block linears in FP8 (`WanConfig.linear_quant="fp8"`), the
    weights quantized once here (`fpsa_jax.model.fp8_linear.quantize_linear_weights`)."""
    return dataclasses.replace(
        weights,
        dit_config=weights.dit_config.replace(linear_quant="fp8"),
        dit_params=quantize_linear_weights(weights.dit_params),
    )


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """Where the parts of a Wan2.1 text-to-video model live (original or diffusers layout)."""

    layout: str
    dit: Path
    vae: Path
    text_encoder: Path
    tokenizer: Path


def find_model_files(ckpt_dir: str | Path) -> ModelFiles:
    """The DiT, VAE, UMT5 and tokenizer paths of an original Wan2.1 directory (config.json +
    diffusion_pytorch_model*.safetensors, Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth,
    google/umt5-xxl/) or a diffusers one (transformer/, vae/, text_encoder/, tokenizer/).

    Raises FileNotFoundError naming every missing part.
    """
    root = Path(ckpt_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"model directory not found: {root}")
    if (root / "transformer").is_dir() or (root / "model_index.json").is_file():
        parts = {
            "dit": root / "transformer",
            "vae": root / "vae",
            "text_encoder": root / "text_encoder",
            "tokenizer": root / "tokenizer",
        }
        layout = "diffusers"
    else:
        parts = {
            "dit": root,
            "vae": root / "Wan2.1_VAE.pth",
            "text_encoder": root / "models_t5_umt5-xxl-enc-bf16.pth",
            "tokenizer": root / "google" / "umt5-xxl",
        }
        layout = "original"
    missing = [str(p) for p in parts.values() if not p.exists()]
    if layout == "original" and not list(root.glob("diffusion_pytorch_model*.safetensors")):
        missing.insert(0, str(root / "diffusion_pytorch_model*.safetensors"))
    if missing:
        raise FileNotFoundError(
            f"{root} is not a complete Wan2.1 text-to-video directory ({layout} layout); "
            f"missing: {', '.join(missing)}"
        )
    return ModelFiles(layout=layout, **parts)


def load_t2v_weights(ckpt_dir: str | Path, dtype: Any = jnp.bfloat16) -> T2VWeights:
    """Loads DiT, VAE (float32, as Wan runs it), UMT5 and tokenizer from a model directory."""
    files = find_model_files(ckpt_dir)
    dit_config, dit_params = load_wan_checkpoint(files.dit, dtype)
    vae_config, vae_params = load_wan_vae(files.vae, jnp.float32)
    text_config, text_params = load_umt5(files.text_encoder, dtype)
    tokenizer = Tokenizer(files.tokenizer, max_length=dit_config.text_len)
    return T2VWeights(
        dit_config, dit_params, vae_config, vae_params, text_config, text_params, tokenizer
    )
