"""The Wan2.1 causal video VAE: encoder, decoder, and chunked `encode` / `decode`.

Shapes (see `config.py`): video [B, F, H, W, C] in [-1, 1] with F = 1 + 4k and H, W multiples
of 8; latents [B, f, h, w, z] with f = 1 + k, h = H / 8, w = W / 8 (Wan2.1 factors).

Like Wan, `encode` runs the encoder on frame 1, then on chunks of 4 frames, and `decode` runs
the decoder latent frame by latent frame (1 frame out, then 4 per latent frame), threading the
causal caches of `layers.py` through `jax.lax.scan`: the result equals one pass over the whole
sequence, while activations stay the size of one chunk. `chunked=False` does that one pass (a
reference for tests; it holds every frame's activations at once).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fpsa_jax.model.vae.config import WanVAEConfig
from fpsa_jax.model.vae.layers import (
    Cache,
    Conv3d,
    Downsample,
    FrameAttention,
    ResBlock,
    RMSNorm,
    Upsample,
    sub_cache,
    with_history,
)

Array = jax.Array
Params = dict[str, Any]


class MidBlock(nn.Module):
    """Residual block, per-frame attention, residual block: [B, T, H, W, C] -> same."""

    @nn.compact
    def __call__(self, x: Array, cache: Cache) -> tuple[Array, Cache]:
        c = x.shape[-1]
        x, c0 = ResBlock(c, name="res_0")(x, sub_cache(cache, "res_0"))
        x = FrameAttention(name="attn")(x)
        x, c1 = ResBlock(c, name="res_1")(x, sub_cache(cache, "res_1"))
        return x, {"res_0": c0, "res_1": c1}


def _head(x: Array, cache: Cache, features: int, new_cache: dict) -> Array:
    """norm_out, SiLU, causal conv_out (called inside the owning module's compact scope)."""
    x = nn.silu(RMSNorm(name="norm_out")(x))
    ctx, new_cache["conv_out"] = with_history(x, sub_cache(cache, "conv_out"))
    return Conv3d(features, (3, 3, 3), name="conv_out")(ctx)


class Encoder(nn.Module):
    """Video chunk [B, T, H, W, C] -> [B, t, H/8, W/8, 2z] (mean and log-variance halves)."""

    config: WanVAEConfig

    @nn.compact
    def __call__(self, x: Array, cache: Cache) -> tuple[Array, Cache]:
        cfg = self.config
        new: dict[str, Cache] = {}
        ctx, new["conv_in"] = with_history(x, sub_cache(cache, "conv_in"))
        x = Conv3d(cfg.base_dim, (3, 3, 3), name="conv_in")(ctx)
        for i, mult in enumerate(cfg.dim_mult):
            for j in range(cfg.num_res_blocks):
                name = f"down_{i}_res_{j}"
                x, new[name] = ResBlock(cfg.base_dim * mult, name=name)(x, sub_cache(cache, name))
            if i < len(cfg.dim_mult) - 1:
                name = f"down_{i}_resample"
                down = Downsample(cfg.temporal_downsample[i], name=name)
                x, new[name] = down(x, sub_cache(cache, name))
        x, new["mid"] = MidBlock(name="mid")(x, sub_cache(cache, "mid"))
        return _head(x, cache, 2 * cfg.z_dim, new), new


class Decoder(nn.Module):
    """Latent chunk [B, t, h, w, z] -> video [B, T, 8h, 8w, C] (T = 1 + 4(t - 1) on the first
    chunk of a video, 4t later), unclipped."""

    config: WanVAEConfig

    @nn.compact
    def __call__(self, x: Array, cache: Cache) -> tuple[Array, Cache]:
        cfg = self.config
        mults = cfg.dim_mult[::-1]
        temporal = cfg.temporal_downsample[::-1]
        new: dict[str, Cache] = {}
        ctx, new["conv_in"] = with_history(x, sub_cache(cache, "conv_in"))
        x = Conv3d(cfg.base_dim * mults[0], (3, 3, 3), name="conv_in")(ctx)
        x, new["mid"] = MidBlock(name="mid")(x, sub_cache(cache, "mid"))
        for i, mult in enumerate(mults):
            dim = cfg.base_dim * mult
            for j in range(cfg.num_res_blocks + 1):
                name = f"up_{i}_res_{j}"
                x, new[name] = ResBlock(dim, name=name)(x, sub_cache(cache, name))
            if i < len(mults) - 1:
                # Wan2.1 halves the channels in each upsampling conv.
                name = f"up_{i}_resample"
                up = Upsample(dim // 2, temporal[i], name=name)
                x, new[name] = up(x, sub_cache(cache, name))
        return _head(x, cache, cfg.in_channels, new), new


class WanVAE(nn.Module):
    """Encoder + quant conv, post-quant conv + decoder. Parameters: {'encoder', 'quant_conv',
    'post_quant_conv', 'decoder'}; use `encode` / `decode` below rather than the methods."""

    config: WanVAEConfig

    def setup(self):
        z = self.config.z_dim
        self.encoder = Encoder(self.config)
        self.quant_conv = Conv3d(2 * z, (1, 1, 1))
        self.post_quant_conv = Conv3d(z, (1, 1, 1))
        self.decoder = Decoder(self.config)

    def encode_chunk(self, x: Array, cache: Cache) -> tuple[Array, Cache]:
        """[B, T, H, W, C] -> (unnormalised latent mean [B, t, h, w, z], cache)."""
        h, cache = self.encoder(x, cache)
        return self.quant_conv(h)[..., : self.config.z_dim], cache

    def decode_chunk(self, z: Array, cache: Cache) -> tuple[Array, Cache]:
        """Unnormalised latents [B, t, h, w, z] -> (video [B, T, H, W, C] unclipped, cache)."""
        return self.decoder(self.post_quant_conv(z), cache)

    def __call__(self, x: Array) -> Array:
        """Whole-sequence round trip without caches; exists to initialise every parameter
        (give it 1 + temporal_factor frames so that the temporal convs run)."""
        mu, _ = self.encode_chunk(x, None)
        return self.decode_chunk(mu, None)[0]


def init_params(config: WanVAEConfig, rng: Array) -> Params:
    """Freshly initialised float32 parameters (shapes only matter: real weights come from
    `fpsa_jax.convert.vae.load_wan_vae`)."""
    s = config.spatial_factor
    video = jnp.zeros((1, 1 + config.temporal_factor, s, s, config.in_channels), jnp.float32)
    return jax.jit(WanVAE(config).init)(rng, video)["params"]


def _scan_chunks(step, cache: Cache, rest: Array, chunk: int) -> Array:
    """Runs `step(cache, x) -> (y, cache)` over `rest` [B, n * chunk, ...] in chunks of `chunk`
    frames; returns the outputs joined along frames, [B, n * T_out, ...]."""
    b, n = rest.shape[0], rest.shape[1] // chunk
    xs = jnp.moveaxis(rest.reshape(b, n, chunk, *rest.shape[2:]), 1, 0)
    _, ys = jax.lax.scan(lambda c, x: step(c, x)[::-1], cache, xs)
    ys = jnp.moveaxis(ys, 0, 1)
    return ys.reshape(b, -1, *ys.shape[3:])


def _param_dtype(params: Params) -> Any:
    return jax.tree_util.tree_leaves(params)[0].dtype


@functools.partial(jax.jit, static_argnums=(0, 3))
def _encode(config: WanVAEConfig, params: Params, video: Array, chunked: bool) -> Array:
    model = WanVAE(config)

    def step(cache: Cache, x: Array) -> tuple[Array, Cache]:
        return model.apply({"params": params}, x, cache, method=WanVAE.encode_chunk)

    video = video.astype(_param_dtype(params))
    if not chunked:
        mu = step(None, video)[0]
    else:
        mu, cache = step(None, video[:, :1])
        if video.shape[1] > 1:
            rest = _scan_chunks(step, cache, video[:, 1:], config.temporal_factor)
            mu = jnp.concatenate([mu, rest], axis=1)
    mean = jnp.asarray(config.latents_mean, mu.dtype)
    inv_std = 1 / jnp.asarray(config.latents_std, jnp.float32)
    return (mu - mean) * inv_std.astype(mu.dtype)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _decode(config: WanVAEConfig, params: Params, latents: Array, chunked: bool) -> Array:
    model = WanVAE(config)

    def step(cache: Cache, z: Array) -> tuple[Array, Cache]:
        return model.apply({"params": params}, z, cache, method=WanVAE.decode_chunk)

    z = latents.astype(_param_dtype(params))
    z = z * jnp.asarray(config.latents_std, z.dtype) + jnp.asarray(config.latents_mean, z.dtype)
    if not chunked:
        video = step(None, z)[0]
    else:
        video, cache = step(None, z[:, :1])
        if z.shape[1] > 1:
            video = jnp.concatenate([video, _scan_chunks(step, cache, z[:, 1:], 1)], axis=1)
    return jnp.clip(video, -1.0, 1.0)


def encode(config: WanVAEConfig, params: Params, video: Array, *, chunked: bool = True) -> Array:
    """Video [B, F, H, W, C] in [-1, 1] -> normalised latent mean [B, 1 + (F - 1) / 4, H / 8,
    W / 8, z], (mu - latents_mean) / latents_std as Wan's `WanVAE.encode` returns it.

    F must be 1 + 4k and H, W multiples of 8 (Wan2.1 factors; see `WanVAEConfig`).
    """
    tf, sf = config.temporal_factor, config.spatial_factor
    _check_rank(video, "video")
    _, f, h, w, c = video.shape
    if c != config.in_channels:
        raise ValueError(
            f"video must have {config.in_channels} channels (channels-last "
            f"[B, F, H, W, C]), got shape {video.shape}"
        )
    if (f - 1) % tf:
        raise ValueError(
            f"video frames must be 1 + {tf}k (the encoder takes frame 1, then "
            f"chunks of {tf}), got F = {f}"
        )
    if h % sf or w % sf:
        raise ValueError(
            f"video height and width must be multiples of {sf} (the spatial "
            f"downsampling factor), got H = {h}, W = {w}"
        )
    return _encode(config, params, video, chunked)


def decode(config: WanVAEConfig, params: Params, latents: Array, *, chunked: bool = True) -> Array:
    """Normalised latents [B, f, h, w, z] -> video [B, 1 + 4(f - 1), 8h, 8w, C] clipped to
    [-1, 1], as Wan's `WanVAE.decode`. `chunked=False` is the whole-sequence reference."""
    _check_rank(latents, "latents")
    if latents.shape[-1] != config.z_dim:
        raise ValueError(
            f"latents must have z_dim = {config.z_dim} channels (channels-last "
            f"[B, f, h, w, C]), got shape {latents.shape}"
        )
    return _decode(config, params, latents, chunked)


def _check_rank(x: Array, what: str) -> None:
    if x.ndim != 5 or 0 in x.shape:
        raise ValueError(
            f"{what} must be a non-empty 5-D channels-last array [B, frames, "
            f"height, width, channels], got shape {x.shape}"
        )
