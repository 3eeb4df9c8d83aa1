"""Wan2.1 video VAE configuration: one frozen dataclass, presets, JSON round trip.

Vocabulary: B batch, F video frames, f latent frames, H/W video height/width, h/w latent
height/width, C channels. Videos are channels-last [B, F, H, W, C] in [-1, 1]; latents
[B, f, h, w, z_dim] with F = 1 + temporal_factor * (f - 1), H = spatial_factor * h.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fpsa_jax.json_config import JsonConfig

# Per-channel statistics of the Wan2.1 latent space (the lists in Wan's `vae.py` and diffusers'
# `AutoencoderKLWan`): encode returns (mu - mean) / std, decode undoes it.
WAN21_LATENTS_MEAN = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
)


@dataclasses.dataclass(frozen=True)
class WanVAEConfig(JsonConfig):
    """Hyper-parameters of the Wan2.1 causal video VAE.

    Level i of the encoder has `base_dim * dim_mult[i]` channels and `num_res_blocks` residual
    blocks; every level but the last halves H and W, and also halves time where
    `temporal_downsample[i]`. The decoder mirrors it (one more residual block per level).
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    def __post_init__(self):
        # JSON gives lists; tuples keep the dataclass hashable (it is a static jit argument).
        for name, cast in (
            ("dim_mult", int),
            ("temporal_downsample", bool),
            ("latents_mean", float),
            ("latents_std", float),
        ):
            object.__setattr__(self, name, tuple(cast(v) for v in getattr(self, name)))
        for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"WanVAEConfig.{name} must be a positive int, got {value!r}")
        if not self.dim_mult or min(self.dim_mult) <= 0:
            raise ValueError(f"WanVAEConfig.dim_mult must be positive ints, got {self.dim_mult}")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"WanVAEConfig.temporal_downsample needs one entry per downsampling level "
                f"({len(self.dim_mult) - 1}), got {self.temporal_downsample}"
            )
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(
                    f"WanVAEConfig.{name} needs z_dim = {self.z_dim} values, got "
                    f"{len(getattr(self, name))}"
                )
        if min(self.latents_std) <= 0:
            raise ValueError(f"WanVAEConfig.latents_std must be positive, got {self.latents_std}")

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame after the first (4 for Wan2.1)."""
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        """Video pixels per latent pixel along H and W (8 for Wan2.1)."""
        return 2 ** (len(self.dim_mult) - 1)

    # -- presets and (de)serialisation ---------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> WanVAEConfig:
        """One of `VAE_PRESETS` ('wan2.1', 'tiny'), optionally with fields replaced."""
        if name not in VAE_PRESETS:
            raise ValueError(f"unknown WanVAEConfig preset {name!r}; valid: {sorted(VAE_PRESETS)}")
        return dataclasses.replace(VAE_PRESETS[name], **overrides)


VAE_PRESETS: dict[str, WanVAEConfig] = {
    # Wan2.1_VAE.pth (also `Wan-AI/Wan2.1-T2V-*-Diffusers`, folder vae/): 126.9M parameters.
    "wan2.1": WanVAEConfig(),
    # diffusers' tiny AutoencoderKLWan(base_dim=3, dim_mult=[1,1,1,1], num_res_blocks=1): tests.
    "tiny": WanVAEConfig(base_dim=3, dim_mult=(1, 1, 1, 1), num_res_blocks=1),
}
