"""`FPSAConfig`: the static description of one FPSA operator (tile, window, quantization).

The config is a frozen, hashable dataclass: it is passed as a static argument under `jax.jit` and
stored as a `flax.linen.Module` attribute, so it must compare and hash by value.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import numpy as np

QuantMode = Literal["none", "fp8"]
QUANT_MODES: tuple[str, ...] = get_args(QuantMode)

# Largest finite value of float8_e4m3fn; the default static scale for P in [0, 1].
E4M3_MAX = 448.0

Int3 = tuple[int, int, int]


def _as_int3(name: str, value: Any) -> Int3:
    """Normalises a length-3 sequence of positive ints (lists from JSON included) to a tuple."""
    if hasattr(value, "tolist"):  # NumPy arrays and scalars
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise ValueError(f"FPSAConfig.{name} must be 3 positive ints (t, h, w), got {value!r}")
    out = []
    for v in value:
        # bool is an Integral; (True, 1, 1) is almost certainly a mistake.
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"FPSAConfig.{name} must be 3 positive ints (t, h, w), got {value!r}")
        v = int(v)
        if v < 1:
            raise ValueError(f"FPSAConfig.{name} entries must be >= 1, got {value!r}")
        out.append(v)
    return (out[0], out[1], out[2])


@dataclasses.dataclass(frozen=True)
class FPSAConfig:
    """One FPSA operator: a 3D tile shared by sparsity and quantization, a window, FP8 or not.

    Attributes:
      tile: tokens per compute tile (tt, th, tw). The tile grid of a token grid G = (T, H, W) is
        (nt, nh, nw) = ceil(G / tile).
      window: sliding-tile window (wt, wh, ww) counted in tiles, or None for dense attention.
        Per axis the window is clipped to the tile grid and shifted (never cut) at borders.
      quant: "none" or "fp8" (E4M3 for Q, K, V and the exponentiated scores P).
      q_group: Q tiles per quantization group along (t, h, w); (1, 1, 1) is one scale per tile.
      k_group: the same for K.
      scale: static scale of P for FP8: p_hat = e4m3(p * scale) / scale. Not the softmax scale.
      smooth_k: subtract each (batch, head)'s mean key over the L tokens before anything else
        (`quant.center_keys`). Exact in real arithmetic: every score of query i moves by the same
        q_i . mean(k), which the softmax (over any allowed key set) ignores. Under FP8 the
        centred keys quantize with less error when the keys share a common offset
        (benchmarks/RESULTS.md, "smooth_k"); on zero-mean keys it changes nothing.
    """

    tile: Int3
    window: Int3 | None = None
    quant: QuantMode = "none"
    q_group: Int3 = (1, 1, 1)
    k_group: Int3 = (1, 1, 1)
    scale: float = E4M3_MAX
    smooth_k: bool = False

    def __post_init__(self):
        # object.__setattr__ because the dataclass is frozen; normalising lists to tuples keeps the
        # config hashable when it comes from JSON.
        object.__setattr__(self, "tile", _as_int3("tile", self.tile))
        if self.window is not None:
            object.__setattr__(self, "window", _as_int3("window", self.window))
        object.__setattr__(self, "q_group", _as_int3("q_group", self.q_group))
        object.__setattr__(self, "k_group", _as_int3("k_group", self.k_group))
        if self.quant not in QUANT_MODES:
            raise ValueError(f"FPSAConfig.quant must be one of {QUANT_MODES}, got {self.quant!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ValueError(f"FPSAConfig.scale must be a number, got {self.scale!r}")
        scale = float(self.scale)
        # p * scale must stay representable: p <= 1, so scale <= 448 avoids overflow to NaN.
        if not (math.isfinite(scale) and 0.0 < scale <= E4M3_MAX):
            raise ValueError(f"FPSAConfig.scale must be in (0, {E4M3_MAX}], got {self.scale!r}")
        object.__setattr__(self, "scale", scale)
        if not isinstance(self.smooth_k, bool):
            raise ValueError(f"FPSAConfig.smooth_k must be True or False, got {self.smooth_k!r}")

    @property
    def tile_volume(self) -> int:
        """Tokens per tile, tt * th * tw."""
        return self.tile[0] * self.tile[1] * self.tile[2]

    def tile_grid(self, grid: Sequence[int]) -> Int3:
        """The tile grid (nt, nh, nw) = ceil(grid / tile)."""
        g = validate_grid(grid)
        return (-(-g[0] // self.tile[0]), -(-g[1] // self.tile[1]), -(-g[2] // self.tile[2]))

    def density(self, grid: Sequence[int]) -> float:
        """Fraction of (query tile, key tile) pairs computed on `grid`: prod(w_a) / prod(n_a)."""
        n = self.tile_grid(grid)
        if self.window is None:
            return 1.0
        w = [min(o, na) for o, na in zip(self.window, n, strict=True)]
        return math.prod(w) / math.prod(n)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict; `from_dict` inverts it."""
        return {
            "tile": list(self.tile),
            "window": None if self.window is None else list(self.window),
            "quant": self.quant,
            "q_group": list(self.q_group),
            "k_group": list(self.k_group),
            "scale": self.scale,
            "smooth_k": self.smooth_k,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FPSAConfig:
        """Builds a config from `to_dict` output; a missing `tile` or an unknown key raises a
        ValueError naming it, other missing fields take their defaults (schedules written before
        a field existed still load)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"FPSAConfig dict must be a mapping of its fields, got {d!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(
                f"FPSAConfig: unknown fields {sorted(unknown)}; valid: {sorted(fields)}"
            )
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in d]
        if missing:
            raise ValueError(f"FPSAConfig: missing fields {missing} (the tile (t, h, w) is needed)")
        return cls(**d)


def validate_grid(grid: Sequence[int]) -> Int3:
    """Validates a token grid (T, H, W) of positive ints (a tuple, list or NumPy array)."""
    if isinstance(grid, np.ndarray) and grid.ndim == 1:
        grid = grid.tolist()  # NumPy ints to Python ints; a float array stays refused below
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or len(grid) != 3:
        raise ValueError(f"grid must be 3 positive ints (T, H, W), got {grid!r}")
    if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 1 for x in grid):
        raise ValueError(f"grid must be 3 positive ints (T, H, W), got {grid!r}")
    return (int(grid[0]), int(grid[1]), int(grid[2]))
