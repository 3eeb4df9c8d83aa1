"""The whole pipeline (denoise + decode) against diffusers' WanPipeline on the same tiny model.

Both sides get the same weights (diffusers' modules, saved with `save_pretrained` and converted
by our loaders), the same embeddings and noise, and the same schedule: diffusers' flow-match Euler
scheduler is made to walk Wan's sigmas and integer timesteps (`flow_schedule`), so the two runs
differ only in float32 rounding.

Tolerance, max |ours - ref| / max |ref| <= 1e-5 for latents and video: one DiT forward agrees
to ~1e-6 (tests/model: <= 1e-5 asserted), the VAE decode likewise (tests/vae); 4 Euler steps add
at most 4 such errors times |dsigma| <= 1 times (1 + 2 g) for guidance g = 3 through the CFG
combination, i.e. a few 1e-6 relative to latents of order 1, and the Euler update itself is the
same float32 expression x + dsigma * v on both sides. Measured: latents 4.1e-7, video 1.2e-6
(diffusers' two batch-B CFG calls against our one batch of 2B make no visible difference).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")  # a test extra, absent on the GPU image
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

from fpsa_jax.pipeline import decode_latents, denoise
from fpsa_jax.sampling import flow_schedule
from tests.pipeline.conftest import FRAMES, HEIGHT, TEXT_LEN, WIDTH

NUM_STEPS, SHIFT, GUIDE = 4, 3.0, 3.0
RTOL = 1e-5


class WanFlowScheduler(FlowMatchEulerDiscreteScheduler):
    """diffusers' flow-match Euler on Wan's schedule: timesteps `flow_schedule(N, shift)
    .timesteps` (integers, as float32 since `step` refuses integer tensors) and sigmas
    `.sigmas` (N + 1, ending at 0), so `step` computes x + (sigma_{i+1} - sigma_i) v."""

    def set_timesteps(self, num_inference_steps=None, device=None, **unused):
        sched = flow_schedule(num_inference_steps, self.config.shift)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.tensor(sched.timesteps, dtype=torch.float32, device=device)
        self.sigmas = torch.tensor(sched.sigmas, dtype=torch.float32)
        self._step_index = None
        self._begin_index = None


def _rel(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def _pad(context: np.ndarray) -> torch.Tensor:
    b, lt, d = context.shape
    return torch.from_numpy(
        np.concatenate([context, np.zeros((b, TEXT_LEN - lt, d), np.float32)], 1)
    )


@pytest.fixture(scope="module")
def diffusers_run(tiny_model, request_inputs):
    """(latents [B, f, h, w, 16], video [B, F, H, W, 3] in [0, 1], the timesteps the
    transformer saw per call) from diffusers' WanPipeline."""
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=tiny_model.vae,
        scheduler=WanFlowScheduler(shift=SHIFT),
        transformer=tiny_model.dit,
    )
    pipe.set_progress_bar_config(disable=True)
    assert (pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal) == (8, 4)
    seen = []
    hook = tiny_model.dit.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["timestep"].clone()), with_kwargs=True
    )
    common = dict(
        prompt_embeds=_pad(request_inputs.context),
        negative_prompt_embeds=_pad(request_inputs.negative_context),
        latents=torch.from_numpy(request_inputs.noise.transpose(0, 4, 1, 2, 3)),
        guidance_scale=GUIDE,
        num_inference_steps=NUM_STEPS,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        return_dict=False,
    )
    try:
        with torch.no_grad():
            latents = pipe(**common, output_type="latent")[0]
            video = pipe(**common, output_type="np")[0]
    finally:
        hook.remove()
    return latents.numpy().transpose(0, 2, 3, 4, 1), video, seen


@pytest.fixture(scope="module")
def our_run(tiny_model, request_inputs):
    latents = denoise(
        tiny_model.weights,
        jnp.asarray(request_inputs.noise),
        jnp.asarray(request_inputs.context),
        jnp.asarray(request_inputs.negative_context),
        num_steps=NUM_STEPS,
        shift=SHIFT,
        guide_scale=GUIDE,
        solver="euler",
    )
    return np.asarray(latents), np.asarray(decode_latents(tiny_model.weights, latents))


def test_diffusers_scheduler_follows_wan_schedule(diffusers_run, request_inputs):
    *_, seen = diffusers_run
    want = flow_schedule(NUM_STEPS, SHIFT).timesteps
    batch = request_inputs.noise.shape[0]
    # Two pipeline runs, each N steps of a conditional then an unconditional call.
    assert len(seen) == 2 * 2 * NUM_STEPS
    for call, t in enumerate(seen):
        assert t.dtype == torch.float32 and t.shape == (batch,)
        np.testing.assert_array_equal(t.numpy(), want[(call // 2) % NUM_STEPS])


def test_pipeline_matches_diffusers_wan_pipeline(diffusers_run, our_run, request_inputs):
    ref_latents, ref_video, _ = diffusers_run
    latents, video = our_run
    assert latents.shape == ref_latents.shape == request_inputs.noise.shape
    assert _rel(latents, ref_latents) <= RTOL
    # The run really denoised: far from the noise it started at.
    assert _rel(latents, request_inputs.noise) > 0.1

    b, f, h, w, _ = latents.shape
    assert video.shape == ref_video.shape == (b, 4 * (f - 1) + 1, 8 * h, 8 * w, 3)
    # A mostly clipped reference would hide errors.
    assert ((ref_video > 0) & (ref_video < 1)).mean() > 0.5
    assert _rel((video + 1) / 2, ref_video) <= RTOL
