"""Sampling the demo model: captions -> pixel videos, with any attention schedule.

The demo model works in pixel space, so sampling is Wan's flow sampler (`fpsa_jax.sampling.sample`)
on noise shaped like the video, with no decoder after it. Classifier-free guidance uses the
all-zero context as the unconditional input: training's text dropout replaces a caption by zeros
(`fpsa_jax.training.drop_text`), so zeros are the null prompt this model knows.

Shapes: videos float32 [B, F, H, W, 3] in [-1, 1] (F, H, W = fpsa_jax.demo.task's 9, 32, 32).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax.attention import Impl, StepSchedule
from fpsa_jax.demo import task
from fpsa_jax.demo.checkpoint import DemoCheckpoint
from fpsa_jax.model.fp8_linear import Fp8LinearImpl, quantize_linear_weights
from fpsa_jax.sampling import sample, wan_model_fn
from fpsa_jax.seeds import check_seed, seed_key


def initial_noise(seeds: Sequence[int]) -> jax.Array:
    """float32 [B, F, H, W, 3]: one standard-normal video per seed (deterministic in the seed,
    `fpsa_jax.seeds.seed_key`)."""
    shape = (task.FRAMES, task.HEIGHT, task.WIDTH, 3)
    return jnp.stack([jax.random.normal(seed_key(int(s)), shape) for s in seeds])


def sampling_inputs(
    captions: Sequence[str], seeds: Sequence[int]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(noise [B, F, H, W, 3], context [B, Lt, D], null context [1, 1, D]) for `sample`: one
    caption and seed per video; the null prompt (CFG's unconditional input) is all zeros."""
    if len(captions) != len(seeds) or not captions:
        raise ValueError(
            f"need one seed per caption (>= 1), got {len(captions)} captions, {len(seeds)} seeds"
        )
    for i, seed in enumerate(seeds):
        check_seed(seed, f"seeds[{i}]")
    context = jnp.asarray(task.encode_captions(list(captions)))
    null = jnp.zeros((1, 1, context.shape[-1]), context.dtype)
    return initial_noise(seeds), context, null


def generate(
    checkpoint: DemoCheckpoint,
    captions: Sequence[str],
    seeds: Sequence[int],
    *,
    schedule: StepSchedule | None,
    guide_scale: float | None = None,
    num_steps: int | None = None,
    shift: float | None = None,
    attention_impl: Impl = "xla",
    model_fn: Callable[..., jax.Array] | None = None,
    progress: Callable[[int, int], None] | None = None,
    linear_impl: Fp8LinearImpl = "cublaslt",
) -> np.ndarray:
    """Videos float32 [B, F, H, W, 3] in [-1, 1] for `captions` (B) from the noise of `seeds` (B).

    schedule: the FPSA operator of each step (None = dense attention), e.g. checkpoint.schedule
    (the one it was trained for). guide_scale, num_steps, shift: None takes the checkpoint's
    sampling settings. The model runs in checkpoint.config.dtype (bfloat16 for the demo preset).
    model_fn overrides the model function (see `fpsa_jax.sampling.sample`), e.g. to trace
    attention errors. A checkpoint whose config has linear_quant "fp8" (`with_linear_quant`) runs
    FP8 block linears (quantized once per call, `params_as`) computed by `linear_impl`
    ("cublaslt" needs FP8 tensor cores, "emulated" runs anywhere).
    """
    noise, context, null = sampling_inputs(captions, seeds)
    s = checkpoint.sampling
    fn = model_fn or wan_model_fn(
        checkpoint.config,
        params_as(checkpoint),
        attention_impl,
        condition=task.model_condition(checkpoint.config),
        linear_impl=linear_impl,
    )
    out = sample(
        fn,
        noise,
        context,
        null,
        num_steps=s.num_steps if num_steps is None else num_steps,
        shift=s.shift if shift is None else shift,
        guide_scale=s.guide_scale if guide_scale is None else guide_scale,
        solver=s.solver,
        schedule=schedule,
        progress=progress,
    )
    return np.clip(np.asarray(out, np.float32), -1.0, 1.0)


def params_as(checkpoint: DemoCheckpoint) -> Any:
    """The checkpoint's parameters as jax arrays (float32 masters; layers cast at use), the block
    linears quantized once when its config has linear_quant "fp8"."""
    params = jax.tree.map(jnp.asarray, checkpoint.params)
    if checkpoint.config.linear_quant == "fp8":
        params = quantize_linear_weights(params)
    return params


def with_linear_quant(checkpoint: DemoCheckpoint, linear_quant: str) -> DemoCheckpoint:
    """`checkpoint` whose model runs its block linears as `linear_quant` ("none" | "fp8")."""
    config = checkpoint.config.replace(linear_quant=linear_quant)
    return dataclasses.replace(checkpoint, config=config)


def with_attention(schedule: StepSchedule, **changes: Any) -> StepSchedule:
    """`schedule` with every phase's FPSAConfig changed, e.g. quant="none" (sparse only) or
    window=None (FP8 only); dense phases stay dense."""
    return StepSchedule(
        tuple(
            dataclasses.replace(
                p, config=None if p.config is None else dataclasses.replace(p.config, **changes)
            )
            for p in schedule.phases
        )
    )
