"""`fpsa_attention` and its closed registry of implementations."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax.attention.config import FPSAConfig, validate_grid
from fpsa_jax.attention.cudnn import cudnn_attention, cudnn_fp8_attention
from fpsa_jax.attention.mosaic import kernel_supports as mosaic_supports
from fpsa_jax.attention.mosaic import mosaic_attention
from fpsa_jax.attention.pallas import pallas_attention
from fpsa_jax.attention.quant import center_keys
from fpsa_jax.attention.reference import reference_attention
from fpsa_jax.attention.triton import kernel_supports as triton_supports
from fpsa_jax.attention.triton import triton_attention
from fpsa_jax.attention.xla import xla_attention

Impl = Literal["auto", "reference", "xla", "cudnn", "cudnn_fp8", "triton", "mosaic", "pallas"]
IMPLS: tuple[str, ...] = get_args(Impl)

# Every implementation: (q, k, v, *, grid, config, scale) -> o, all [B, L, N, D].
AttentionFn = Callable[..., jax.Array]


REGISTRY: dict[str, AttentionFn] = {
    "reference": reference_attention,
    "xla": xla_attention,
    "cudnn": cudnn_attention,
    "cudnn_fp8": cudnn_fp8_attention,
    "triton": triton_attention,
    "mosaic": mosaic_attention,
    "pallas": pallas_attention,
}


def check_impl(impl: str) -> Impl:
    """`impl` when it names an implementation (one of `IMPLS`), else a ValueError listing them.

    Callers that build a model function check its impl with this once, before loading weights or
    tracing, so a typo fails fast; `fpsa_attention` checks again at trace time.
    """
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid: {', '.join(IMPLS)}")
    return impl


def resolve_impl(impl: Impl, config: FPSAConfig | None, dtype, head_dim: int) -> Impl:
    """The concrete implementation `impl` stands for (only "auto" is resolved).

    "auto": FPSA configs go to the Mosaic GPU forward where both it and the Triton kernels run
    these inputs (its backward, pre-pass and dequantize are Triton's: a Hopper GPU with
    jax-triton, a power-of-two head dim, >= 32 for FP8, FP8 or 16-bit inputs), else to "triton"
    where that runs, else to "xla". Mosaic is faster than Triton at every density of the benchmark
    table (benchmarks/RESULTS.md, session 12). Dense (config=None) 16-bit attention on a
    GPU goes to cuDNN, and everything else to "xla".
    """
    if check_impl(impl) != "auto":
        return impl
    if config is not None:
        if not triton_supports(dtype, head_dim, config):
            return "xla"
        return "mosaic" if mosaic_supports(dtype, head_dim, config) else "triton"
    if (
        jax.default_backend() == "gpu"
        and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim % 8 == 0
        and head_dim <= 256
    ):
        return "cudnn"
    return "xla"


def _check_inputs(q, k, v, grid) -> tuple[int, int, int]:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [B, L, N, D], got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a floating dtype, got {x.dtype}")
    if not q.shape == k.shape == v.shape:
        raise ValueError(
            f"q, k, v must have the same [B, L, N, D] shape, got q {q.shape}, "
            f"k {k.shape}, v {v.shape}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    g = validate_grid(grid)
    if math.prod(g) != q.shape[1]:
        raise ValueError(f"grid {g} has T*H*W = {math.prod(g)} tokens but L = {q.shape[1]}")
    return g


def _check_scale(scale):
    """`scale` as a float when it is a finite number > 0 (None and traced values pass as they
    are), else ValueError."""
    if scale is None or isinstance(scale, jax.core.Tracer):
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, np.ndarray, jax.Array)):
        raise ValueError(f"scale must be a finite number > 0 or None, got {scale!r}")
    value = float(scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"scale must be a finite number > 0 (the softmax scale; None = 1/sqrt(D)), got {value}"
        )
    return value


def clip_tile(config: FPSAConfig, grid: tuple[int, int, int]) -> FPSAConfig:
    """`config` with its tile cut to the token grid per axis: min(tile_a, G_a).

    Exact: on an axis where tile_a >= G_a the tile grid has n_a = 1 either way, so the window
    (w_a = min(omega_a, n_a) = 1), the quantization groups (one tile) and the valid tokens are
    the same; only the padded slots go, which no query attends and whose outputs are dropped.
    Without it a tile larger than the grid would make every implementation allocate for the
    tile's slots instead of the grid's tokens.
    """
    tile = tuple(min(t, n) for t, n in zip(config.tile, grid, strict=True))
    return config if tile == config.tile else dataclasses.replace(config, tile=tile)


def fpsa_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    grid,
    config=None,
    impl: Impl = "auto",
    scale: float | None = None,
) -> jax.Array:
    """FPSA attention (DESIGN.md section 3) over a 3D token grid.

    Args:
      q, k, v: [B, L, N, D] with L = T * H * W tokens in row-major (t, h, w) order.
      grid: (T, H, W) ints (a tuple, list or 1-D NumPy array), static.
      config: an `FPSAConfig` (tile, window, FP8), or None for dense unquantized attention. A
        tile larger than the grid on an axis is cut to the grid there (`clip_tile`, exact).
      impl: one of `IMPLS`; see `resolve_impl` for "auto".
      scale: softmax scale, a finite number > 0 (NaN, inf, 0 or negative raise ValueError);
        None means 1 / sqrt(D).

    Returns:
      o: [B, L, N, D] in q's dtype.

    Non-finite inputs. Without quantization they follow IEEE arithmetic: an inf in K makes
    q . k = +-inf, so each query row attending it is NaN (+inf - +inf in the softmax) or ignores
    that key (-inf), and a NaN anywhere in a row's scores makes that row NaN. With quant="fp8" the
    Q/K/V scales are absmaxes over the finite values only (`quant.finite_abs`), and an inf
    saturates to +-448 * s, the largest magnitude of its group (E4M3 has no infinity): an inf in K
    gives finite outputs everywhere (that key weighs as its group's largest), never a NaN head;
    a NaN stays NaN in its own entry and makes NaN the rows that attend it, as without FP8.

    FP8 error grows with the size of the scores: sharper softmax rows put their weight on a few
    keys, and the E4M3 rounding of q and k (a relative 2^-4 per value) moves each logit by an
    amount proportional to it. Measured (benchmarks/fp8_score_error.py, CPU, 3 seeds): relative
    L2 of the FP8 output against the same operator unquantized, q, k, v standard normal with q
    multiplied by c so the logits q.k/sqrt(D) have standard deviation c; L=512 (grid (4, 8, 16)),
    N=2, D=64, tile (2, 4, 4), groups (1, 1, 1); `reference` and `xla` agree to 0.01%:
      c:                     0.5    1      2      4      8
      full window            4.2%   5.3%   7.4%   9.0%   11.9%
      window of 25% tiles    4.1%   5.1%   6.5%   7.9%   10.5%
    """
    g = _check_inputs(q, k, v, grid)
    scale = _check_scale(scale)
    if config is not None and not isinstance(config, FPSAConfig):
        raise ValueError(f"config must be an FPSAConfig or None, got {type(config).__name__}")
    if config is not None:
        config = clip_tile(config, g)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    name = resolve_impl(impl, config, q.dtype, q.shape[-1])
    # The scope names every op of the operator in HLO metadata and profiles
    # (benchmarks/layer_profile.py tells the operator's time from the rest of a layer by it).
    with jax.named_scope(f"fpsa_attention_{name}"):
        if config is not None and config.smooth_k:  # one place for every impl
            k = center_keys(k)
        return REGISTRY[name](q, k, v, grid=g, config=config, scale=scale)
