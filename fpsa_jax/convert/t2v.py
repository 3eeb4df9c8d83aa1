"""A Wan2.1 text-to-video model directory -> the weights of every part (`T2VWeights`).

Finds the DiT, VAE, UMT5 encoder and tokenizer in the original layout or the diffusers one and
loads each with its converter; `fpsa_jax.pipeline` runs text to video on the result, and
`fpsa_jax.data.encoders` precomputes training records with it. `with_fp8_linears` quantizes the
DiT's block linears of loaded weights once (`WanConfig.linear_quant="fp8"`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from fpsa_jax.config import WanConfig
from fpsa_jax.convert.checkpoint import load_wan_checkpoint
from fpsa_jax.convert.torch_io import needs_torch
from fpsa_jax.convert.umt5 import load_umt5
from fpsa_jax.convert.vae import load_wan_vae
from fpsa_jax.model.fp8_linear import quantize_linear_weights
from fpsa_jax.model.umt5 import TOKENIZER_FILE, Tokenizer, UMT5Config
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


@dataclasses.dataclass(frozen=True)
class Requirement:
    """A Python package that loading a model directory needs: its import name, how to install
    it, and which file needs it."""

    module: str
    install: str
    needed_by: str


def requirements(files: ModelFiles) -> list[Requirement]:
    """The packages beyond the always-imported ones (jax, numpy, ml_dtypes, safetensors) that
    loading `files` needs: `tokenizers` for the tokenizer, torch only for a `.pth` in torch's
    legacy (pre-zip) format."""
    needed = [
        Requirement("tokenizers", "pip install tokenizers", str(files.tokenizer / TOKENIZER_FILE))
    ]
    for path in (files.vae, files.text_encoder):
        if path.is_file() and path.suffix in (".pth", ".pt") and needs_torch(path):
            needed.append(Requirement("torch", "pip install 'fpsa-jax[convert]'", str(path)))
    return needed


def missing_requirements(files: ModelFiles) -> list[Requirement]:
    """`requirements(files)` that cannot be imported here."""
    missing = []
    for req in requirements(files):
        try:
            found = importlib.util.find_spec(req.module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(req)
    return missing


def check_t2v_directory(ckpt_dir: str | Path) -> ModelFiles:
    """`find_model_files` plus everything else loading them needs, checked before any weight is
    read: the tokenizer's tokenizer.json, and every package of `requirements` importable.

    Raises FileNotFoundError naming every missing file, ImportError naming every missing package
    with the file that needs it and how to install it.
    """
    files = find_model_files(ckpt_dir)
    if not (files.tokenizer / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(
            f"{files.tokenizer} has no {TOKENIZER_FILE} (the google/umt5-xxl tokenizer as the "
            "Wan2.1 and diffusers repos ship it)"
        )
    missing = missing_requirements(files)
    if missing:
        raise ImportError(
            "loading this model needs "
            + "; ".join(f"{r.module} for {r.needed_by} ({r.install})" for r in missing)
        )
    return files


def load_t2v_weights(
    ckpt_dir: str | Path,
    dtype: Any = jnp.bfloat16,
    progress: Callable[[str], None] | None = None,
) -> T2VWeights:
    """Loads DiT, VAE (float32, as Wan runs it), UMT5 and tokenizer from a model directory,
    after `check_t2v_directory` (so nothing loads when a file or package is missing).
    `progress`, when given, is called with the name of each part ("DiT", "VAE", "UMT5",
    "tokenizer") as it starts loading."""
    files = check_t2v_directory(ckpt_dir)
    report = progress or (lambda part: None)
    report("DiT")
    dit_config, dit_params = load_wan_checkpoint(files.dit, dtype)
    report("VAE")
    vae_config, vae_params = load_wan_vae(files.vae, jnp.float32)
    report("UMT5")
    text_config, text_params = load_umt5(files.text_encoder, dtype)
    report("tokenizer")
    tokenizer = Tokenizer(files.tokenizer, max_length=dit_config.text_len)
    return T2VWeights(
        dit_config, dit_params, vae_config, vae_params, text_config, text_params, tokenizer
    )
