"""Wan2.1 DiT configuration: one frozen dataclass, one preset per checkpoint, JSON round trip.

Vocabulary used across the package: B batch, L tokens, N heads, D head dim, C channels,
F/H/W latent frames/height/width, T/H/W token grid after patchify.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from fpsa_jax.json_config import JsonConfig

_DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
LINEAR_QUANTS = ("none", "fp8")


@dataclasses.dataclass(frozen=True)
class WanConfig(JsonConfig):
    """Hyper-parameters of the Wan2.1 text-to-video DiT.

    `dtype` is the compute dtype of matmuls and attention; `param_dtype` the dtype of freshly
    initialised parameters. The float32 islands of the original (time embedding, modulation,
    norms, RoPE, residual stream, head) stay float32 whatever `dtype` says.

    `linear_quant="fp8"` runs the block matmuls (self-attention q/k/v/o, cross-attention q/o and
    the text k/v, FFN in/out) as E4M3 x E4M3 with float32 accumulation
    (`fpsa_jax.model.fp8_linear`); everything else is unchanged.
    """

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: str = "none"
    linear_quant: str = "none"

    def __post_init__(self):
        # JSON gives lists; keep the dataclass hashable.
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        for name in (
            "dim",
            "ffn_dim",
            "num_heads",
            "num_layers",
            "in_dim",
            "out_dim",
            "text_dim",
            "text_len",
            "freq_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"WanConfig.{name} must be a positive int, got {value!r}")
        if len(self.patch_size) != 3 or min(self.patch_size) <= 0:
            raise ValueError(f"WanConfig.patch_size must be 3 positive ints, got {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(
                f"WanConfig.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(
                f"WanConfig head_dim = dim / num_heads = {self.head_dim} must be even and >= 6 "
                "(RoPE splits it over t, h, w)"
            )
        if self.freq_dim % 2:
            raise ValueError(f"WanConfig.freq_dim must be even, got {self.freq_dim}")
        if not self.eps > 0:
            raise ValueError(f"WanConfig.eps must be > 0, got {self.eps}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(
                    f"WanConfig.{name} must be one of {_DTYPES}, got {getattr(self, name)!r}"
                )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"WanConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.linear_quant not in LINEAR_QUANTS:
            raise ValueError(
                f"WanConfig.linear_quant must be one of {LINEAR_QUANTS}, got {self.linear_quant!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Real channels of each head that RoPE rotates by t, h and w position (44/42/42 at 128)."""
        hw = 2 * (self.head_dim // 6)
        return (self.head_dim - 2 * hw, hw, hw)

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)

    def num_params(self) -> int:
        """Parameter count of the DiT with this config (matches the original's count)."""
        d, f, c = self.dim, self.ffn_dim, self.patch_volume
        linear = lambda i, o: i * o + o  # noqa: E731
        attn = 4 * linear(d, d) + (2 * d if self.qk_norm else 0)
        block = (
            6 * d + 2 * attn + (2 * d if self.cross_attn_norm else 0) + linear(d, f) + linear(f, d)
        )
        return (
            linear(self.in_dim * c, d)
            + linear(self.text_dim, d)
            + linear(d, d)
            + linear(self.freq_dim, d)
            + linear(d, d)
            + linear(d, 6 * d)
            + self.num_layers * block
            + 2 * d
            + linear(d, self.out_dim * c)
        )

    # -- presets and (de)serialisation ---------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> WanConfig:
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown WanConfig preset {name!r}; valid: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[key], **overrides)

    def replace(self, **changes: Any) -> WanConfig:
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> WanConfig:
        return cls.from_json(Path(path).read_text())


PRESETS: dict[str, WanConfig] = {
    "t2v-1.3b": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "t2v-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # Same code path at toy size: CPU tests, the demo and smoke runs.
    "tiny": WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=64, text_len=32),
    # The embedded demo model (fpsa_jax.demo): pixel space (RGB out, no VAE), RGB plus the task's
    # three position channels in (fpsa_jax.demo.task explains both), a (1, 4, 4) patch so a
    # 9 x 32 x 32 clip is a (9, 8, 8) token grid, stand-in word vectors as text.
    "demo": WanConfig(
        dim=192,
        ffn_dim=512,
        num_heads=3,
        num_layers=4,
        in_dim=6,
        out_dim=3,
        text_dim=32,
        text_len=8,
        patch_size=(1, 4, 4),
    ),
}
