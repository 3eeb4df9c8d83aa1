"""Text to video with Wan2.1: prompts -> UMT5 embeddings -> flow sampling (FPSA per step) -> VAE.

Functions over explicit weights (`fpsa_jax.convert.load_t2v_weights` loads them);
`text_to_video` runs one request through every stage and reports the seconds each took. The app
(`python -m infer`) owns flags, files and progress bars. Shapes: latents [B, f, h, w, 16] with
f = (frames - 1) / 4 + 1 and (h, w) = (height, width) / 8; videos [B, frames, height, width, 3]
in [-1, 1].
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fpsa_jax.attention import Impl, StepSchedule
from fpsa_jax.config import LINEAR_QUANTS
from fpsa_jax.convert import T2VWeights, with_fp8_linears
from fpsa_jax.model import vae as wan_vae
from fpsa_jax.model.fp8_linear import Fp8LinearImpl, check_backend
from fpsa_jax.model.umt5 import encode_text
from fpsa_jax.parallel import use_sharding
from fpsa_jax.sampling import SolverName, sample, wan_model_fn
from fpsa_jax.seeds import check_seed, seed_key

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
    linear_impl: Fp8LinearImpl = "cublaslt",
) -> jax.Array:
    """Runs Wan's sampler from `noise` [B, f, h, w, 16] to clean latents (same shape).

    `schedule` picks the FPSA operator of each step (None = dense attention throughout); the
    loop compiles once per distinct phase (see `fpsa_jax.sampling.sample`). With a `mesh`
    (`fpsa_jax.parallel.make_mesh`) the loop runs under its sharding rules: self-attention is
    sequence-parallel (Ulysses) over the mesh's 'seq' axis, the CFG batch spread over data/fsdp.
    `linear_impl` computes the block linears of FP8 weights (`fpsa_jax.convert.with_fp8_linears`).
    """
    model_fn = _model_fn(weights, attention_impl, linear_impl)
    return _sample(
        model_fn,
        noise,
        context,
        negative_context,
        mesh,
        num_steps=num_steps,
        shift=shift,
        guide_scale=guide_scale,
        solver=solver,
        schedule=schedule,
        progress=progress,
    )


def _model_fn(weights: T2VWeights, attention_impl: Impl, linear_impl: Fp8LinearImpl):
    cfg = weights.dit_config
    return wan_model_fn(cfg, weights.dit_params, attention_impl, linear_impl=linear_impl)


def _sample(model_fn, noise, context, negative_context, mesh, **settings) -> jax.Array:
    run = functools.partial(sample, model_fn, noise, context, negative_context, **settings)
    if mesh is None:
        return run()
    with use_sharding(mesh):
        return run()


def decode_latents(weights: T2VWeights, latents: jax.Array) -> jax.Array:
    """Latents [B, f, h, w, 16] -> video [B, 4(f - 1) + 1, 8h, 8w, 3] in [-1, 1]."""
    return wan_vae.decode(weights.vae_config, weights.vae_params, latents)


def initial_noise(seed: int, shape: tuple[int, ...]) -> jax.Array:
    """Standard normal float32 latents, deterministic in `seed` (`fpsa_jax.seeds.seed_key`; not
    torch's stream: the same seed gives a different video than Wan's PyTorch code)."""
    return jax.random.normal(seed_key(seed), shape, jnp.float32)


@dataclasses.dataclass(frozen=True)
class T2VRequest:
    """One video to generate: what, how large, from which noise, with which sampler settings.

    The size (`check_video_request`) and linear_quant are checked on construction. schedule picks
    the FPSA operator of each step (None = dense attention throughout). linear_quant "fp8" runs
    the DiT's block linears in FP8 (`WanConfig.linear_quant`): float weights are quantized once
    per `text_to_video` call, FP8 ones (`fpsa_jax.convert.with_fp8_linears`) run as they are;
    "none" refuses FP8 weights. The defaults are Wan2.1's (1.3B at 480p).
    """

    prompt: str
    width: int = 832
    height: int = 480
    frames: int = 81
    seed: int = 0
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    num_steps: int = 50
    shift: float = 5.0
    guide_scale: float = 5.0
    solver: SolverName = "unipc"
    schedule: StepSchedule | None = None
    linear_quant: str = "none"

    def __post_init__(self):
        check_video_request(self.width, self.height, self.frames)
        check_seed(self.seed, "T2VRequest.seed")
        if self.linear_quant not in LINEAR_QUANTS:
            raise ValueError(
                f"T2VRequest.linear_quant must be one of {LINEAR_QUANTS}, got {self.linear_quant!r}"
            )


@dataclasses.dataclass(frozen=True)
class T2VResult:
    """latents [1, f, h, w, 16]; video [1, frames, height, width, 3] in [-1, 1]; timings: seconds
    per stage ("text encoding", "denoising (incl. compilation)", "decoding")."""

    latents: jax.Array
    video: jax.Array
    timings: dict[str, float]


def text_to_video(
    weights: T2VWeights,
    request: T2VRequest,
    *,
    attention_impl: Impl = "auto",
    progress: Callable[[int, int], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    linear_impl: Fp8LinearImpl = "cublaslt",
) -> T2VResult:
    """The video of `request`: encode the prompts, denoise the seed's noise, decode.

    The model function is built (the weights brought to request.linear_quant, attention_impl and
    linear_impl checked) before any prompt is encoded, and whether linear_impl runs here before
    any weight is quantized; progress, mesh and linear_impl as in `denoise`.
    """
    if request.linear_quant == "fp8":
        check_backend(linear_impl)
    weights = _with_linear_quant(weights, request.linear_quant)
    model_fn = _model_fn(weights, attention_impl, linear_impl)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    context = encode_prompts(weights, [request.prompt])
    negative_context = encode_prompts(weights, [request.negative_prompt])
    jax.block_until_ready((context, negative_context))
    timings["text encoding"] = time.perf_counter() - start

    r = request
    shape = latent_shape(1, r.width, r.height, r.frames, weights.dit_config.in_dim)
    noise = initial_noise(r.seed, shape)
    start = time.perf_counter()
    latents = _sample(
        model_fn,
        noise,
        context,
        negative_context,
        mesh,
        num_steps=r.num_steps,
        shift=r.shift,
        guide_scale=r.guide_scale,
        solver=r.solver,
        schedule=r.schedule,
        progress=progress,
    )
    timings["denoising (incl. compilation)"] = time.perf_counter() - start

    start = time.perf_counter()
    video = jax.block_until_ready(decode_latents(weights, latents))
    timings["decoding"] = time.perf_counter() - start
    return T2VResult(latents, video, timings)


def _with_linear_quant(weights: T2VWeights, linear_quant: str) -> T2VWeights:
    """`weights` whose DiT runs its block linears as `linear_quant` ("none" | "fp8")."""
    if weights.dit_config.linear_quant == linear_quant:
        return weights
    if linear_quant == "fp8":
        return with_fp8_linears(weights)
    raise ValueError(
        "the weights hold FP8 block linears (dit_config.linear_quant 'fp8') but the request has "
        f"linear_quant={linear_quant!r}; load the float weights to run float linears"
    )
