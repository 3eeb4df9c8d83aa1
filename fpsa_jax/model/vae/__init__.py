"""The Wan2.1 causal video VAE in Flax linen (channels-last [B, F, H, W, C] videos)."""

from fpsa_jax.model.vae.config import VAE_PRESETS, WanVAEConfig
from fpsa_jax.model.vae.model import WanVAE, decode, encode, init_params

__all__ = ["VAE_PRESETS", "WanVAE", "WanVAEConfig", "decode", "encode", "init_params"]
