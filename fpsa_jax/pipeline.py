"""Text to video with Wan2.1: prompts -> UMT5 embeddings -> flow sampling (FPSA per step) -> VAE.

Pure functions over explicit weights; the app (`python -m infer`) owns flags, files, progress
bars and timing. Shapes: latents [B, f, h, w, 16] with f = (frames - 1) / 4 + 1 and (h, w) =
(height, width) / 8; videos [B, frames, height, width, 3] in [-1, 1].
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fpsa_jax.attention import Impl, StepSchedule
from fpsa_jax.convert import T2VWeights
from fpsa_jax.model import vae as wan_vae
from fpsa_jax.model.umt5 import encode_text
from fpsa_jax.parallel import use_sharding
from fpsa_jax.sampling import sample, wan_model_fn

# Wan2.1's default negative prompt (`sample_neg_prompt` of its shared config), used when the
# user gives none, as Wan's generate.py does.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
# Pixels per latent cell (VAE stride) and the DiT's patch on top of it: sizes must divide by 16.
SIZE_MULTIPLE = 16


def check_video_request(width: int, height: int, frames: int) -> None:
    """Raises ValueError naming the problem when a size or frame count cannot be generated."""
    for name, value in (("width", width), ("height", height), ("frames", frames)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"video {name} must be an int, got {value!r}")
    if width <= 0 or height <= 0 or width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        raise ValueError(
            f"video size {width}*{height} (width*height): both must be positive multiples of "
            f"{SIZE_MULTIPLE} (VAE stride 8 x DiT patch 2)"
        )
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(
            f"frame count must be 4k+1 (1, 5, ..., 81): the VAE compresses 4 frames per latent "
            f"frame after the first; got {frames}"
        )


def latent_shape(
    batch: int, width: int, height: int, frames: int, channels: int = 16
) -> tuple[int, ...]:
    """[B, f, h, w, C] of the latents of a video of `frames` frames at width*height."""
    check_video_request(width, height, frames)
    return (batch, (frames - 1) // 4 + 1, height // 8, width // 8, channels)


def encode_prompts(weights: T2VWeights, prompts: list[str]) -> jax.Array:
    """UMT5 embeddings [B, text_len, text_dim], each prompt cut to its true length and
    zero-padded, as Wan feeds its DiT."""
    if weights.tokenizer is None or weights.text_params is None:
        raise ValueError("these weights have no text encoder; pass embeddings instead")
    ids, mask = weights.tokenizer(prompts)
    return encode_text(
        weights.text_params, weights.text_config, ids, mask, pad_to=weights.dit_config.text_len
    )


def denoise(
    weights: T2VWeights,
    noise: jax.Array,
    context: jax.Array,
    negative_context: jax.Array,
    *,
    num_steps: int,
    shift: float,
    guide_scale: float,
    solver: str = "unipc",
    schedule: StepSchedule | None = None,
    attention_impl: Impl = "auto",
    progress: Callable[[int, int], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> jax.Array:
    """Runs Wan's sampler from `noise` [B, f, h, w, 16] to clean latents (same shape).

    `schedule` picks the FPSA operator of each step (None = dense attention throughout); the
    loop compiles once per distinct phase (see `fpsa_jax.sampling.sample`). With a `mesh`
    (`fpsa_jax.parallel.make_mesh`) the loop runs under its sharding rules: self-attention is
    sequence-parallel (Ulysses) over the mesh's 'seq' axis, the CFG batch spread over data/fsdp.
    """
    model_fn = wan_model_fn(weights.dit_config, weights.dit_params, attention_impl)
    run = functools.partial(
        sample,
        model_fn,
        noise,
        context,
        negative_context,
        num_steps=num_steps,
        shift=shift,
        guide_scale=guide_scale,
        solver=solver,
        schedule=schedule,
        progress=progress,
    )
    if mesh is None:
        return run()
    with use_sharding(mesh):
        return run()


def decode_latents(weights: T2VWeights, latents: jax.Array) -> jax.Array:
    """Latents [B, f, h, w, 16] -> video [B, 4(f - 1) + 1, 8h, 8w, 3] in [-1, 1]."""
    return wan_vae.decode(weights.vae_config, weights.vae_params, latents)


def initial_noise(seed: int, shape: tuple[int, ...]) -> jax.Array:
    """Standard normal float32 latents, deterministic in `seed` (not torch's stream: the same
    seed gives a different video than Wan's PyTorch code)."""
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)
