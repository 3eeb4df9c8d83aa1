"""The denoising loop: classifier-free guidance, a solver, and the FPSA operator chosen per step.

Compilation. A `StepSchedule` assigns each step an `FPSAConfig` (or None = dense). The steps are
cut into contiguous segments of one config (`step_segments`); each segment runs as one jitted
`jax.lax.fori_loop` whose config is a static argument, and whose bounds, guidance scale and
tables are traced. `jax.jit`'s cache therefore holds one program per distinct config (for given
shapes, solver and model function), not one per step or per segment: a three-phase schedule
compiles three times, and a second video with the same shapes compiles nothing.

Model function. `model_fn(latents [2B, F, H, W, C], timesteps [2B], context [2B, Lt, D],
attention) -> velocity [2B, F, H, W, C]`. A plain function is a static part of the compiled
program, and so is anything it closes over: arrays it closes over become constants of the
program. Bind weights with `jax.tree_util.Partial(fn, params)` (fn(params, latents, ...)) so
they stay traced arguments; `wan_model_fn` does this for `WanModel`, and its model function
names the XLA options its programs need (FP8 linears on cuBLASLt: `segment_runner`).

Progress. Each step ends with a `jax.debug.callback` that reports (steps done, N) to the host,
so a progress bar moves per step while the loop itself stays on the device. The hook runs on a
runtime thread, possibly once per device under a multi-device sharding, so it should be cheap and
idempotent (set the bar to `step`, do not add 1); `sample` waits for every report before it
returns.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import numbers
import threading
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from fpsa_jax.attention import FPSAConfig, Impl, StepSchedule, check_impl
from fpsa_jax.config import WanConfig
from fpsa_jax.model import fp8_linear
from fpsa_jax.model.fp8_linear import Fp8LinearImpl
from fpsa_jax.model.wan import WanModel
from fpsa_jax.sampling.euler import euler_init, euler_step, euler_tables
from fpsa_jax.sampling.schedule import flow_schedule
from fpsa_jax.sampling.unipc import unipc_init, unipc_step, unipc_tables

SolverName = Literal["unipc", "euler"]
SOLVER_NAMES: tuple[str, ...] = get_args(SolverName)


class Solver(NamedTuple):
    """A sampler: host coefficient tables from the sigmas, an initial state, a jittable step."""

    tables: Callable[[np.ndarray], np.ndarray]  # sigmas [N + 1] -> float64 [N, K]
    init: Callable[[jax.Array], Any]  # x -> state pytree
    step: Callable[..., tuple[jax.Array, Any]]  # (row [K], state, x, v) -> (x_next, state)


SOLVERS: dict[str, Solver] = {
    "unipc": Solver(unipc_tables, unipc_init, unipc_step),
    "euler": Solver(euler_tables, euler_init, euler_step),
}

ProgressFn = Callable[[int, int], None]


class Segment(NamedTuple):
    """Steps start <= i < stop run with one attention config (None = dense)."""

    start: int
    stop: int
    attention: FPSAConfig | None


def step_segments(schedule: StepSchedule | None, num_steps: int) -> tuple[Segment, ...]:
    """The step range cut into maximal runs of one config, in step order."""
    if schedule is None:
        return (Segment(0, num_steps, None),)
    segments: list[Segment] = []
    for i in range(num_steps):
        cfg = schedule.config_for_step(i, num_steps)
        if segments and segments[-1].attention == cfg:
            segments[-1] = segments[-1]._replace(stop=i + 1)
        else:
            segments.append(Segment(i, i + 1, cfg))
    return tuple(segments)


# A Flax method interceptor: (next_fun, args, kwargs, context) -> output (nn.intercept_methods).
Interceptor = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class _WanApply:
    """Hashable `WanModel.apply` for `wan_model_fn` (equal fields share compiled programs; an
    interceptor is compared by identity)."""

    config: WanConfig
    attention_impl: Impl
    interceptor: Interceptor | None = None
    linear_impl: Fp8LinearImpl = "cublaslt"

    def __call__(self, params, condition, latents, timesteps, context, attention):
        model = WanModel(
            self.config, attention_impl=self.attention_impl, linear_impl=self.linear_impl
        )
        apply = functools.partial(
            model.apply,
            {"params": params},
            latents,
            timesteps,
            context,
            attention=attention,
            condition=condition,
        )
        if self.interceptor is None:
            return apply()
        with nn.intercept_methods(self.interceptor):
            out, _ = apply(mutable=["intermediates"])
        return out

    @property
    def compiler_options(self) -> dict[str, bool]:
        """XLA options the programs calling this model need (FP8 linears on cuBLASLt)."""
        return fp8_linear.compiler_options(self.config.linear_quant, self.linear_impl)


def wan_model_fn(
    config: WanConfig,
    params: Any,
    attention_impl: Impl = "auto",
    condition: Any = None,
    interceptor: Interceptor | None = None,
    linear_impl: Fp8LinearImpl = "cublaslt",
) -> Partial:
    """A `model_fn` for `sample` that runs `WanModel(config)` with `params` (and the model's
    `condition` channels [1, F, H, W, C'], if any, shared by every sample) as traced arguments.

    attention_impl is checked here (`fpsa_jax.attention.check_impl`): an unknown name raises
    ValueError listing the valid ones before anything is traced. So is `linear_impl`, the impl of
    the FP8 linears of a `linear_quant="fp8"` config (`fpsa_jax.model.fp8_linear.check_impl`),
    and for such a config whether it runs on this backend (`check_backend`: "cublaslt" needs FP8
    tensor cores). `interceptor`, a Flax method interceptor, wraps every module method call of
    each model call (e.g. to measure a layer, as `fpsa_jax.demo.attention_trace` does); under it
    the "intermediates" collection is mutable, so modules may sow into it and the interceptor read
    the result when `WanModel.__call__` returns (the collection is dropped after each call).
    """
    linear_impl = fp8_linear.check_impl(linear_impl)
    if config.linear_quant == "fp8":
        fp8_linear.check_backend(linear_impl)
    apply = _WanApply(config, check_impl(attention_impl), interceptor, linear_impl)
    return Partial(apply, params, condition)


# Progress hooks of the runs in flight, by run id (a traced int32, so hooks never recompile).
_HOOKS: dict[int, ProgressFn] = {}
_HOOKS_LOCK = threading.Lock()
_RUN_IDS = itertools.count(1)


def _report_progress(run_id, step, num_steps, anchor) -> None:
    del anchor  # only makes the report wait for the step's result
    hook = _HOOKS.get(int(run_id))
    if hook is not None:
        hook(int(step), int(num_steps))


def _segment_body(
    model_fn,
    x,
    state,
    rows,
    timesteps,
    context,
    guide_scale,
    start,
    stop,
    run_id,
    *,
    attention,
    solver,
):
    """Steps start..stop-1 of one attention config; x [B, F, H, W, C], context [2B, Lt, D]."""
    step_fn = SOLVERS[solver].step
    num_steps = rows.shape[0]

    def body(i, carry):
        x, state = carry
        # Conditional and unconditional in one batch of 2B: [x; x], [context; negative].
        latents = jnp.concatenate([x, x], axis=0)
        t = jnp.broadcast_to(timesteps[i], (latents.shape[0],))
        out = model_fn(latents, t, context, attention).astype(x.dtype)
        cond, uncond = jnp.split(out, 2, axis=0)
        v = uncond + guide_scale.astype(x.dtype) * (cond - uncond)
        x, state = step_fn(rows[i], state, x, v)
        jax.debug.callback(_report_progress, run_id, i + 1, num_steps, x.reshape(-1)[0])
        return x, state

    return jax.lax.fori_loop(start, stop, body, (x, state))


_run_segment = jax.jit(_segment_body, static_argnames=("attention", "solver"))


@functools.cache
def _run_segment_with(options: tuple[tuple[str, bool], ...]):
    """`_run_segment` compiled with XLA `options` (one jit, and so one cache, per option set)."""
    if not options:
        return _run_segment
    return jax.jit(
        _segment_body, static_argnames=("attention", "solver"), compiler_options=dict(options)
    )


def segment_runner(model_fn):
    """The jitted segment loop for `model_fn`: with the XLA options its model needs when it is a
    `wan_model_fn` (`_WanApply.compiler_options`), else the plain one."""
    options = getattr(getattr(model_fn, "func", None), "compiler_options", None) or {}
    return _run_segment_with(tuple(sorted(options.items())))


def _check_inputs(model_fn, noise, context, negative_context, guide_scale, solver, schedule):
    if not callable(model_fn):
        raise ValueError(f"model_fn must be callable, got {type(model_fn).__name__}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid: {', '.join(SOLVER_NAMES)}")
    if isinstance(guide_scale, bool) or not isinstance(guide_scale, numbers.Real):
        raise ValueError(f"guide_scale must be a finite number >= 0, got {guide_scale!r}")
    if not (math.isfinite(guide_scale) and guide_scale >= 0):
        raise ValueError(f"guide_scale must be a finite number >= 0, got {guide_scale}")
    if schedule is not None and not isinstance(schedule, StepSchedule):
        raise ValueError(f"schedule must be a StepSchedule or None, got {type(schedule).__name__}")
    if noise.ndim != 5 or not jnp.issubdtype(noise.dtype, jnp.floating):
        raise ValueError(
            f"noise must be a float [B, F, H, W, C] array, got {noise.dtype} {noise.shape}"
        )
    b = noise.shape[0]
    if context.ndim != 3 or context.shape[0] != b:
        raise ValueError(f"context must be [B={b}, Lt, D], got shape {context.shape}")
    if (
        negative_context.ndim != 3
        or negative_context.shape[0] not in (1, b)
        or negative_context.shape[2] != context.shape[2]
    ):
        raise ValueError(
            f"negative_context must be [B={b} or 1, Lt', D={context.shape[2]}], got shape "
            f"{negative_context.shape}"
        )


def _pad_rows(c: jax.Array, length: int) -> jax.Array:
    return jnp.pad(c, ((0, 0), (0, length - c.shape[1]), (0, 0)))


def sample(
    model_fn: Callable[..., jax.Array],
    noise: jax.Array,
    context: jax.Array,
    negative_context: jax.Array,
    *,
    num_steps: int,
    shift: float,
    guide_scale: float,
    solver: SolverName = "unipc",
    schedule: StepSchedule | None = None,
    progress: ProgressFn | None = None,
) -> jax.Array:
    """Denoises `noise` with Wan2.1's flow sampler and classifier-free guidance.

    Args:
      model_fn: (latents [2B, F, H, W, C], timesteps [2B] float in 0..1000, context [2B, Lt, D],
        attention: FPSAConfig | None) -> velocity v = eps - x0 [2B, F, H, W, C]. A plain function
        or a `jax.tree_util.Partial` (see the module docstring).
      noise: [B, F, H, W, C] float, the sample at sigma_0 (Wan: standard normal, float32).
      context: [B, Lt, D] text embeddings of the prompt.
      negative_context: [B or 1, Lt', D] of the negative prompt. If Lt' != Lt the shorter one is
        zero-padded on the token axis, which is what `WanModel` does up to its text_len anyway.
      num_steps: N >= 1 (Wan: 50). shift: schedule shift > 0 (Wan: 5.0).
      guide_scale: g >= 0; v = u + g (c - u) for the conditional c and unconditional u.
      solver: "unipc" (Wan's default) or "euler".
      schedule: the FPSA operator of each step (step i of N); None runs dense attention.
      progress: optional host hook progress(steps_done, N), called after each step.

    Returns:
      The denoised latents [B, F, H, W, C] in noise's dtype; deterministic given the inputs.
    """
    noise = jnp.asarray(noise)
    context = jnp.asarray(context)
    negative_context = jnp.asarray(negative_context)
    _check_inputs(model_fn, noise, context, negative_context, guide_scale, solver, schedule)
    sched = flow_schedule(num_steps, shift)
    spec = SOLVERS[solver]
    rows = jnp.asarray(spec.tables(sched.sigmas), jnp.float32)
    timesteps = jnp.asarray(sched.timesteps, jnp.float32)

    b = noise.shape[0]
    neg = jnp.broadcast_to(negative_context, (b, *negative_context.shape[1:]))
    lt = max(context.shape[1], neg.shape[1])
    ctx = jnp.concatenate([_pad_rows(context, lt), _pad_rows(neg.astype(context.dtype), lt)])

    fn = model_fn if isinstance(model_fn, Partial) else Partial(model_fn)
    run_segment = segment_runner(fn)
    x, state = noise, spec.init(noise)
    g = jnp.float32(guide_scale)
    run_id = next(_RUN_IDS) % (2**31 - 1)
    if progress is not None:
        with _HOOKS_LOCK:
            _HOOKS[run_id] = progress
    try:
        for seg in step_segments(schedule, sched.num_steps):
            x, state = run_segment(
                fn,
                x,
                state,
                rows,
                timesteps,
                ctx,
                g,
                jnp.int32(seg.start),
                jnp.int32(seg.stop),
                jnp.int32(run_id),
                attention=seg.attention,
                solver=solver,
            )
        x = jax.block_until_ready(x)
        if progress is not None:
            jax.effects_barrier()  # every report has reached the hook
    finally:
        if progress is not None:
            with _HOOKS_LOCK:
                _HOOKS.pop(run_id, None)
    return x
