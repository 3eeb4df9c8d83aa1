"""Per-step attention error along a sampling run: each layer's self-attention under the step's
FPSA operator against dense attention on the very same inputs (the paper's error-versus-step
figure, in miniature).

How. `traced_model_fn` is `wan_model_fn` with an attention probe (`fpsa_jax.sampling.
attention_probe`): at every self-attention call it runs the operator twice on the layer's actual
inputs q, k, v, once with the step's `FPSAConfig` and once dense, and reduces the two outputs
o [B, L, N, D] to the sums behind the relative L2 error and the cosine similarity
(`fpsa_jax.attention.metrics.error_sums`, pooled over heads); they reach the host step by step,
layer by layer. The model's own output (what the sampler continues from) is unchanged: the
trajectory is the configured one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from fpsa_jax.attention import Impl, fpsa_attention
from fpsa_jax.attention.metrics import error_sums, errors_from_sums
from fpsa_jax.config import WanConfig
from fpsa_jax.demo import task
from fpsa_jax.sampling import AttentionCall, attention_probe, wan_model_fn


class ErrorLog:
    """Collects (||o - o_dense||^2, ||o_dense||^2, ||o||^2, <o, o_dense>) per layer call."""

    def __init__(self):
        self.rows: list[tuple[float, float, float, float]] = []

    def __call__(self, sums) -> None:
        """sums: [num_layers, 4] of one model call."""
        self.rows.extend(tuple(map(float, row)) for row in np.asarray(sums, np.float64))

    def per_step(self, num_steps: int, num_layers: int) -> StepErrors:
        """The collected sums as [num_steps, num_layers] errors (checks the count)."""
        jax.effects_barrier()
        if len(self.rows) != num_steps * num_layers:
            raise ValueError(
                f"expected {num_steps} x {num_layers} attention calls, got {len(self.rows)}"
            )
        a = np.asarray(self.rows, np.float64).reshape(num_steps, num_layers, 4)
        errors = errors_from_sums(np.moveaxis(a, -1, 0))
        return StepErrors(rel_l2=errors.rel_l2, cosine=errors.cosine)


@dataclasses.dataclass(frozen=True)
class StepErrors:
    """float64 [num_steps, num_layers]: ||o - o_dense|| / ||o_dense|| and cos(o, o_dense)."""

    rel_l2: np.ndarray
    cosine: np.ndarray


def _measure(q, k, v, call: AttentionCall) -> jax.Array:
    """[4] sums of the step's operator against dense attention on the same q, k, v."""
    o = fpsa_attention(q, k, v, grid=call.grid, config=call.attention, impl=call.impl)
    ref = fpsa_attention(q, k, v, grid=call.grid, config=None, impl=call.impl)
    return error_sums(o, ref).sum(axis=-1)


def traced_model_fn(config: WanConfig, params, log: ErrorLog, attention_impl: Impl = "xla"):
    """A `model_fn` for `fpsa_jax.sampling.sample` that reports attention errors to `log` (a
    demo model: it gets the demo task's position channels, `task.model_condition`); one compiled
    program per call."""
    return wan_model_fn(
        config,
        params,
        attention_impl,
        condition=task.model_condition(config),
        interceptor=attention_probe(_measure, log),
    )


def mean_over_layers(errors: StepErrors) -> dict[str, Sequence[float]]:
    """{"rel_l2": [num_steps], "cosine": [num_steps]}: the mean over layers of each step."""
    return {"rel_l2": errors.rel_l2.mean(axis=1), "cosine": errors.cosine.mean(axis=1)}
