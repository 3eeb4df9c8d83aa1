"""The real encoders for precomputing training records: Wan's VAE and UMT5 behind the same two
methods as `StandInEncoder` (encode_video, encode_text) plus `describe` for the dataset index."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from fpsa_jax.convert import T2VWeights


class Encoder(Protocol):
    """What `train.prepare` needs of an encoder."""

    def encode_video(self, video: np.ndarray) -> np.ndarray:
        """[F, H, W, 3] in [-1, 1] -> latent [f, h, w, C]."""
        ...

    def encode_text(self, caption: str) -> np.ndarray:
        """Caption -> embedding [Lt, E] cut to its true length."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able description, stored in the dataset index."""
        ...


class WanEncoder:
    """Wan2.1's VAE (normalised latent mean, as Wan's `WanVAE.encode`) and UMT5 (each caption cut
    to its true token length, at most the DiT's text_len) from loaded `T2VWeights`."""

    def __init__(self, weights: T2VWeights, source: str = ""):
        if weights.tokenizer is None or weights.text_params is None:
            raise ValueError("WanEncoder needs weights with a text encoder and tokenizer")
        self.weights, self.source = weights, source

    def encode_video(self, video: np.ndarray) -> np.ndarray:
        import jax.numpy as jnp

        from fpsa_jax.model import vae as wan_vae

        w = self.weights
        latents = wan_vae.encode(w.vae_config, w.vae_params, jnp.asarray(video)[None])
        return np.asarray(latents[0], np.float32)

    def encode_text(self, caption: str) -> np.ndarray:
        from fpsa_jax.model.umt5 import encode_text

        w = self.weights
        ids, mask = w.tokenizer([caption])
        (text,) = encode_text(w.text_params, w.text_config, ids, mask)
        return np.asarray(text.astype("float32"))

    def describe(self) -> dict[str, Any]:
        w = self.weights
        return {
            "encoder": "wan2.1",
            "ckpt_dir": self.source,
            "vae": w.vae_config.to_dict(),
            "text_len": w.dit_config.text_len,
        }
