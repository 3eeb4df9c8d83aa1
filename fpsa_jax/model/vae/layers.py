"""Building blocks of the Wan2.1 VAE: causal convolution, channel RMS norm, residual block,
per-frame attention and the resampling layers, all on channels-last [B, T, H, W, C].

Causal state. A kernel-3 causal conv pads time by 2 frames in front only, so output frame t
sees input frames t-2, t-1, t. Processing a video in chunks therefore only needs the last 2
input frames of the previous chunk: that pair is the conv's cache, and with it a chunked pass
equals a whole-sequence pass. Every module that mixes time takes `cache` (a pytree, or None
for the first chunk of a video, which behaves like an all-zero history) and returns
`(y, new_cache)` with the same pytree structure whatever the chunk, so the caller can
`jax.lax.scan` over chunks (per-frame layers such as the attention take no cache).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Cache = Any  # a pytree of [B, n, H, W, C] arrays, or None at the start of a video
CACHE_T = 2  # frames a kernel-3 causal conv needs from the past

_F32 = jnp.float32


def sub_cache(cache: Cache, name: str) -> Cache:
    return None if cache is None else cache[name]


def _precision(dtype: Any) -> jax.lax.Precision | None:
    # float32 parity with torch needs full-precision dots (GPUs would otherwise use TF32).
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == _F32 else None


def with_history(x: Array, cache: Array | None) -> tuple[Array, Array]:
    """[B, T, H, W, C] -> ([B, 2 + T, H, W, C] input with its 2-frame past, new [B, 2, ...] cache).

    The past is the cache, or zeros at the start of a video (the causal padding).
    """
    if cache is None:
        ctx = jnp.pad(x, ((0, 0), (CACHE_T, 0), (0, 0), (0, 0), (0, 0)))
    else:
        ctx = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
    return ctx, ctx[:, -CACHE_T:]


class Conv3d(nn.Module):
    """A conv that is 'valid' in time (the caller supplies the past) and zero-padded in space.

    [B, T, H, W, Cin] -> [B, (T - kt) // stride + 1, H', W', features]; kernel [kt, kh, kw, Cin,
    Cout]. `space_pad` (low, high) pads H and W; None means k // 2 on both sides ('same').
    """

    features: int
    kernel: tuple[int, int, int]
    stride: tuple[int, int, int] = (1, 1, 1)
    space_pad: tuple[int, int] | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kt, kh, kw = self.kernel
        w = self.param(
            "kernel", nn.initializers.lecun_normal(), (kt, kh, kw, x.shape[-1], self.features), _F32
        )
        b = self.param("bias", nn.initializers.zeros, (self.features,), _F32)
        ph = self.space_pad or (kh // 2, kh // 2)
        pw = self.space_pad or (kw // 2, kw // 2)
        y = jax.lax.conv_general_dilated(
            x,
            w.astype(x.dtype),
            window_strides=self.stride,
            padding=((0, 0), ph, pw),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
            precision=_precision(x.dtype),
        )
        return y + b.astype(x.dtype)


class RMSNorm(nn.Module):
    """Wan's RMS_norm over channels: x / max(|x|_2, 1e-12) * sqrt(C) * scale, in float32.

    (The L2 normalisation times sqrt(C) is x / rms(x); Wan2.1 uses it without bias.)
    """

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), _F32)
        xf = x.astype(_F32)
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        return (xf / jnp.maximum(norm, 1e-12) * (c**0.5) * scale).astype(x.dtype)


class ResBlock(nn.Module):
    """norm-SiLU-conv twice plus a (1x1x1 conv when channels change) shortcut.

    [B, T, H, W, Cin] -> [B, T, H, W, features]; cache {'conv1', 'conv2'}.
    """

    features: int

    @nn.compact
    def __call__(self, x: Array, cache: Cache) -> tuple[Array, Cache]:
        shortcut = x
        if x.shape[-1] != self.features:
            shortcut = Conv3d(self.features, (1, 1, 1), name="shortcut")(x)
        new_cache = {}
        h = x
        for i in (1, 2):
            h = nn.silu(RMSNorm(name=f"norm{i}")(h))
            ctx, new_cache[f"conv{i}"] = with_history(h, sub_cache(cache, f"conv{i}"))
            h = Conv3d(self.features, (3, 3, 3), name=f"conv{i}")(ctx)
        return h + shortcut, new_cache


class FrameAttention(nn.Module):
    """Single-head self-attention over the H x W positions of each frame, with a residual.

    [B, T, H, W, C] -> [B, T, H, W, C]; no time mixing, hence no cache.
    """

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, t, h, w, c = x.shape
        qkv = Conv3d(3 * c, (1, 1, 1), name="qkv")(RMSNorm(name="norm")(x))
        q, k, v = jnp.split(qkv.reshape(b, t, h * w, 3 * c), 3, axis=-1)
        p = _precision(x.dtype)
        logits = jnp.einsum("btqc,btkc->btqk", q, k, precision=p) / jnp.sqrt(c).astype(x.dtype)
        probs = jax.nn.softmax(logits.astype(_F32), axis=-1).astype(x.dtype)
        out = jnp.einsum("btqk,btkc->btqc", probs, v, precision=p).reshape(b, t, h, w, c)
        return Conv3d(c, (1, 1, 1), name="proj")(out) + x


class Downsample(nn.Module):
    """Halves H and W (zero pad right/bottom, 3x3 conv stride 2), and time where `temporal`.

    [B, T, H, W, C] -> [B, T', H/2, W/2, C]. The temporal conv (kernel 3, stride 2, no padding)
    reads the last frame of the previous chunk (cache [B, 1, h, w, C]); the first chunk's first
    frame passes through, so 1 + 2n frames give 1 + n, and chunks of 2n frames give n.
    """

    temporal: bool

    @nn.compact
    def __call__(self, x: Array, cache: Cache) -> tuple[Array, Cache]:
        c = x.shape[-1]
        x = Conv3d(c, (1, 3, 3), stride=(1, 2, 2), space_pad=(0, 1), name="conv")(x)
        if not self.temporal:
            return x, {}
        time_conv = Conv3d(c, (3, 1, 1), stride=(2, 1, 1), name="time_conv")
        new_cache = {"time_conv": x[:, -1:]}
        if cache is None:
            y = x[:, :1]
            if x.shape[1] > 1:
                y = jnp.concatenate([y, time_conv(x)], axis=1)
            return y, new_cache
        return time_conv(jnp.concatenate([cache["time_conv"], x], axis=1)), new_cache


class Upsample(nn.Module):
    """Doubles H and W (nearest, then 3x3 conv to `features`), and time where `temporal`.

    [B, T, H, W, C] -> [B, T', 2H, 2W, features]. The temporal step is a causal conv to 2C
    channels whose halves become two consecutive frames. Wan skips it for the first frame of a
    video, which passes through alone, and does not keep that frame in the cache (its "Rep"
    marker is an all-zero history): T frames give 1 + 2(T - 1) on the first chunk, 2T later.
    """

    features: int
    temporal: bool

    @nn.compact
    def __call__(self, x: Array, cache: Cache) -> tuple[Array, Cache]:
        new_cache: Cache = {}
        if self.temporal:
            time_conv = Conv3d(2 * x.shape[-1], (3, 1, 1), name="time_conv")
            first, rest = (x[:, :1], x[:, 1:]) if cache is None else (None, x)
            ctx, new_cache["time_conv"] = with_history(rest, sub_cache(cache, "time_conv"))
            if rest.shape[1]:
                rest = _interleave_frames(time_conv(ctx))
            x = rest if first is None else jnp.concatenate([first, rest], axis=1)
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        return Conv3d(self.features, (1, 3, 3), name="conv")(x), new_cache


def _interleave_frames(y: Array) -> Array:
    """[B, T, H, W, 2C] -> [B, 2T, H, W, C]: channels [:C] are frame 2t, [C:] frame 2t + 1."""
    b, t, h, w, c2 = y.shape
    y = y.reshape(b, t, h, w, 2, c2 // 2)
    return jnp.moveaxis(y, 4, 2).reshape(b, 2 * t, h, w, c2 // 2)
