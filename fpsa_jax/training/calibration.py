"""Measuring candidate FPSA operators along a model's dense sampling run (schedule calibration).

`measure_step_errors` samples each given (noise, prompt) with dense attention. At every step and
self-attention layer an attention probe (`fpsa_jax.sampling.attention_probe`) takes the layer's
inputs q, k, v [2B, L, N, D] (the CFG pair) and the token grid, runs every candidate operator
and dense attention on them, and reduces each candidate's output against the dense one to the
sums behind its error (`fpsa_jax.attention.metrics.error_sums`) on the device; the sums reach the
host once per step. So the inputs are evaluated where they are made instead of being copied out:
at Wan2.1 1.3B and 480p one step's q, k, v over 30 layers are ~18 GB, which no host could keep for
50 steps. The trajectory is the dense model's own (the probe does not change the output).

`fpsa_jax.attention.calibration.select_schedule` then picks phases and operators from the
result; `python -m train.calibrate` is the app.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax.attention import FPSAConfig, Impl, fpsa_attention
from fpsa_jax.attention.calibration import StepErrors
from fpsa_jax.attention.metrics import error_sums
from fpsa_jax.config import WanConfig
from fpsa_jax.sampling import AttentionCall, SolverName, attention_probe, sample, wan_model_fn


class Sample(NamedTuple):
    """One sampling run: noise [B, F, H, W, C] (the sample at sigma_0), the prompt's context
    [B, Lt, D] and the negative prompt's [B or 1, Lt', D] (see `fpsa_jax.sampling.sample`)."""

    noise: Any
    context: Any
    negative_context: Any


def candidate_measure(candidates: Sequence[FPSAConfig | None]):
    """A probe `measure`: float32 [C, 4, N] sums of each candidate against dense attention."""
    candidates = tuple(candidates)

    def measure(q, k, v, call: AttentionCall) -> jax.Array:
        def run(config):
            return fpsa_attention(q, k, v, grid=call.grid, config=config, impl=call.impl)

        ref = run(None)
        return jnp.stack([error_sums(ref if c is None else run(c), ref) for c in candidates])

    return measure


def measure_step_errors(
    config: WanConfig,
    params: Any,
    samples: Sequence[Sample],
    candidates: Sequence[FPSAConfig | None],
    *,
    num_steps: int,
    shift: float,
    guide_scale: float,
    solver: SolverName = "unipc",
    condition: Any = None,
    attention_impl: Impl = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> StepErrors:
    """The errors of `candidates` (None = dense) at every step and layer of dense sampling.

    Args:
      config, params: the DiT (`WanModel(config)`), run dense in config.dtype.
      samples: the runs to measure; their sums are pooled. Every run has the same shapes (one
        compiled program serves them all).
      candidates: the operators to evaluate, e.g. `attention.calibration.candidate_configs`.
      num_steps, shift, guide_scale, solver: the sampler settings (as `sample` takes them); a
        schedule calibrated at N steps is meant for sampling at N steps.
      condition: the model's extra input channels [1, F, H, W, C'], if any (the demo model's).
      attention_impl: the implementation every operator (candidates and dense) runs with.
      progress: optional host hook progress(steps_done, total) over all runs.

    Returns:
      `StepErrors` with sums [num_steps, num_layers, C, 4, N].
    """
    candidates = tuple(candidates)
    if not candidates:
        raise ValueError("need at least one candidate operator")
    if not samples:
        raise ValueError("need at least one sample (noise and prompt) to measure")
    shape = np.shape(samples[0].noise)
    if len(shape) != 5:
        raise ValueError(f"noise must be [B, F, H, W, C], got shape {shape}")
    grid = tuple(s // p for s, p in zip(shape[1:4], config.patch_size, strict=True))
    reports: list[np.ndarray] = []
    model_fn = wan_model_fn(
        config,
        params,
        attention_impl,
        condition=condition,
        interceptor=attention_probe(
            candidate_measure(candidates), lambda s: reports.append(np.asarray(s, np.float64))
        ),
    )
    total = None
    for i, run in enumerate(samples):
        hook = None
        if progress is not None:
            hook = lambda done, n, i=i: progress(i * n + done, len(samples) * n)  # noqa: E731
        sample(
            model_fn,
            run.noise,
            run.context,
            run.negative_context,
            num_steps=num_steps,
            shift=shift,
            guide_scale=guide_scale,
            solver=solver,
            progress=hook,
        )
        jax.effects_barrier()  # every step's report has arrived
        if len(reports) != num_steps:
            raise RuntimeError(f"expected {num_steps} step reports, got {len(reports)}")
        sums = np.stack(reports)  # [S, num_layers, C, 4, N]
        reports.clear()
        total = sums if total is None else total + sums
    return StepErrors(candidates, grid, total, num_samples=len(samples))
