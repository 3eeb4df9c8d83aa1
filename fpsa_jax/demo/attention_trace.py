"""Per-step attention error along a sampling run: each layer's self-attention under the step's
FPSA operator against dense attention on the very same inputs (the paper's error-versus-step
figure, in miniature).

How. `traced_model_fn` is `wan_model_fn` with a Flax method interceptor. At every self-attention
call (the `Attention` modules with a token grid) it runs the layer twice on the layer's actual
input, once with the step's `FPSAConfig` and once dense, both with the output projection replaced
by the identity so that the operator's output o [B, L, N * D] is compared, not its projection.
Each layer sows the sums behind the relative L2 error and the cosine similarity; when the model
call returns they go to the host through an ordered `jax.debug.callback`, so they arrive step by
step, layer by layer. The model's own output (what the sampler continues from) is unchanged: the
trajectory is the configured one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax.attention import Impl
from fpsa_jax.config import WanConfig
from fpsa_jax.demo import task
from fpsa_jax.model.wan import Attention, WanModel
from fpsa_jax.sampling import wan_model_fn


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
        err2, ref2, out2, dot = np.moveaxis(a, -1, 0)
        return StepErrors(rel_l2=np.sqrt(err2 / ref2), cosine=dot / np.sqrt(out2 * ref2))


@dataclasses.dataclass(frozen=True)
class StepErrors:
    """float64 [num_steps, num_layers]: ||o - o_dense|| / ||o_dense|| and cos(o, o_dense)."""

    rel_l2: np.ndarray
    cosine: np.ndarray


def _identity_output(params, dim: int):
    """Self-attention params with the output projection replaced by the identity."""
    eye = jnp.eye(dim, dtype=params["o"]["kernel"].dtype)
    return {**params, "o": {"kernel": eye, "bias": jnp.zeros((dim,), eye.dtype)}}


def _interceptor(log: ErrorLog):
    measuring = []  # non-empty while the two measuring runs trace (they are not measured)

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if measuring or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(module, WanModel):
            out = next_fun(*args, **kwargs)
            # [num_layers, 4], sown per layer and stacked by the blocks' scan; in step order.
            (sums,) = jax.tree.leaves(module.variables["intermediates"])
            jax.debug.callback(log, sums, ordered=True)
            return out
        if not (isinstance(module, Attention) and module.grid is not None):
            return next_fun(*args, **kwargs)
        params = _identity_output(module.variables["params"], module.config.dim)
        (x,) = args
        run = lambda cfg: Attention(  # noqa: E731
            module.config, module.grid, cfg, module.attention_impl
        ).apply({"params": params}, x)
        measuring.append(True)
        try:
            o = run(module.attention).astype(jnp.float32)
            ref = run(None).astype(jnp.float32)
        finally:
            measuring.pop()
        sums = jnp.stack(
            [
                jnp.sum(jnp.square(o - ref)),
                jnp.sum(jnp.square(ref)),
                jnp.sum(jnp.square(o)),
                jnp.sum(o * ref),
            ]
        )
        module.sow("intermediates", "attention_error_sums", sums)
        return next_fun(*args, **kwargs)

    return intercept


def traced_model_fn(config: WanConfig, params, log: ErrorLog, attention_impl: Impl = "xla"):
    """A `model_fn` for `fpsa_jax.sampling.sample` that reports attention errors to `log` (a
    demo model: it gets the demo task's position channels, `task.model_condition`); one compiled
    program per call."""
    return wan_model_fn(
        config,
        params,
        attention_impl,
        condition=task.model_condition(config),
        interceptor=_interceptor(log),
    )


def mean_over_layers(errors: StepErrors) -> dict[str, Sequence[float]]:
    """{"rel_l2": [num_steps], "cosine": [num_steps]}: the mean over layers of each step."""
    return {"rel_l2": errors.rel_l2.mean(axis=1), "cosine": errors.cosine.mean(axis=1)}
