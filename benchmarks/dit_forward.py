"""One Wan2.1 DiT forward on a GPU: ms per forward and per layer, split into the self-attention
operator and the rest, and peak device memory.

Random bf16 weights (the head randomised too, so no output is trivially zero), random latents,
timesteps and text. Self-attention per --attention: "dense" (the operator with no FPSA config:
cuDNN bf16 under impl "auto" on a GPU) or PRESET:PHASE, one phase of a StepSchedule preset (e.g.
wan-720p:2, the late phase). Median of timed runs after a warm-up, each synchronised with
block_until_ready. --linear_quant none fp8 times each case with bf16 and with FP8 block linears
(weights quantized at load, `fpsa_jax.model.fp8_linear`) in the same run; --num_layers cuts the
preset to fewer blocks (ms per layer stays comparable, compiles faster).

Split: the self-attention operator alone (`fpsa_attention` on random bf16 q, k, v of the layer's
shape [B, L, N, D], same config and impl, its own jit) is timed in the same run; "rest" = ms per
layer - that. It assumes the operator costs inside the block what it costs alone (it is one
kernel call either way); the norms, RoPE, projections, cross-attention and FFN are the rest.

    python benchmarks/dit_forward.py                       # 1.3B/480p and 14B/720p
    python benchmarks/dit_forward.py --batch 2 --linear_quant none fp8 --num_layers 8
    python benchmarks/dit_forward.py --cases 14b-720p --batch 2 --num_layers 2 \
        --attention dense wan-720p:2 --linear_quant none fp8
    python benchmarks/dit_forward.py --cases tiny-cpu      # smoke test anywhere
    python benchmarks/dit_forward.py --cases tiny-cpu --linear_quant fp8 --linear_impl emulated
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fpsa_jax.attention import IMPLS, FPSAConfig, Impl, StepSchedule, fpsa_attention
from fpsa_jax.config import LINEAR_QUANTS, WanConfig
from fpsa_jax.model.fp8_linear import (
    FP8_LINEAR_IMPLS,
    Fp8LinearImpl,
    check_backend,
    compiler_options,
    quantize_linear_weights,
)
from fpsa_jax.model.random_weights import random_weights
from fpsa_jax.model.wan import WanModel, init_params

# name: (preset, frames, latent H, latent W) -- 81 frames -> 21 latent frames; pixels / 8.
CASES = {
    "1.3b-480p": ("t2v-1.3b", 21, 60, 104),
    "14b-720p": ("t2v-14b", 21, 90, 160),
    "tiny-cpu": ("tiny", 3, 16, 16),
    # The 1.3B model's widths on 3 x 15 x 26 = 1,170 tokens (480p's aspect): its linears' error
    # on a CPU (fp8_linear_error.py --linear_impl emulated), where a real grid is out of reach.
    "1.3b-cpu": ("t2v-1.3b", 3, 30, 52),
}


def parse_attention(spec: str) -> FPSAConfig | None:
    """None for "dense", else the FPSAConfig of "PRESET:PHASE"; ValueError naming the problem."""
    if spec == "dense":
        return None
    preset, sep, phase = spec.partition(":")
    if not sep or not phase.isdigit():
        raise ValueError(f"--attention takes dense or PRESET:PHASE (e.g. wan-720p:2), got {spec!r}")
    phases = StepSchedule.preset(preset).phases
    if int(phase) >= len(phases):
        raise ValueError(f"--attention {spec}: {preset} has phases 0..{len(phases) - 1}")
    return phases[int(phase)].config


def median_ms(fn, *args, repeats: int) -> tuple[float, float, float]:
    """(first call s, median ms, min ms) of fn(*args), each call synchronised."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(out)), "non-finite output"
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, 1e3 * statistics.median(times), 1e3 * min(times)


@dataclasses.dataclass(frozen=True)
class Case:
    """One DiT forward ready to run: `forward(*args)`; the self-attention's grid, [B, L, N, D]
    shape, config (None: dense) and impl; the labels it was built from."""

    name: str
    attention: str  # "dense" or PRESET:PHASE
    impl: Impl
    config: WanConfig
    forward: Callable
    args: tuple
    grid: tuple[int, int, int]
    qkv_shape: tuple[int, int, int, int]
    fpsa: FPSAConfig | None


def build_case(
    name: str,
    impl: Impl = "auto",
    linear_quant: str = "none",
    linear_impl: Fp8LinearImpl = "cublaslt",
    batch: int = 1,
    num_layers: int | None = None,
    attention: str = "dense",
) -> Case:
    """Random weights (FP8 linears quantized at load for "fp8"), latents, timesteps and text of
    case `name`, and the jitted forward."""
    preset, f, h, w = CASES[name]
    overrides = {} if num_layers is None else {"num_layers": num_layers}
    config = WanConfig.preset(preset, dtype="bfloat16", param_dtype="bfloat16", **overrides)
    params = random_weights(functools.partial(init_params, config), jax.random.key(0))
    if linear_quant == "fp8":
        config = config.replace(linear_quant="fp8")
        params = quantize_linear_weights(params)  # at load: the bf16 kernels are dropped
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    latents = jax.random.normal(k1, (batch, f, h, w, config.in_dim), jnp.float32)
    timesteps = jax.random.uniform(k2, (batch,), jnp.float32, 0, 1000)
    context = jax.random.normal(k3, (batch, config.text_len, config.text_dim), jnp.bfloat16)
    model = WanModel(config, attention_impl=impl, linear_impl=linear_impl)
    fpsa = parse_attention(attention)
    forward = jax.jit(
        lambda p, x, t, c: model.apply({"params": p}, x, t, c, attention=fpsa),
        compiler_options=compiler_options(config.linear_quant, linear_impl),
    )
    pt, ph, pw = config.patch_size
    grid = (f // pt, h // ph, w // pw)
    qkv_shape = (batch, math.prod(grid), config.num_heads, config.head_dim)
    args = (params, latents, timesteps, context)
    return Case(name, attention, impl, config, forward, args, grid, qkv_shape, fpsa)


def run_case(case: Case, repeats: int) -> dict:
    """Times the forward and the self-attention operator alone at the layer's shape."""
    config, params = case.config, case.args[0]
    compile_s, ms, min_ms = median_ms(case.forward, *case.args, repeats=repeats)
    grid, fpsa, qkv_shape, impl = case.grid, case.fpsa, case.qkv_shape, case.impl
    q, k, v = (
        jax.random.normal(key, qkv_shape, jnp.bfloat16)
        for key in jax.random.split(jax.random.key(2), 3)
    )
    operator = jax.jit(lambda q, k, v: fpsa_attention(q, k, v, grid=grid, config=fpsa, impl=impl))
    _, attention_ms, _ = median_ms(operator, q, k, v, repeats=repeats)
    stats = jax.devices()[0].memory_stats() or {}
    tokens = qkv_shape[1]
    return {
        "case": case.name,
        "linear_quant": config.linear_quant,
        "batch": qkv_shape[0],
        "layers": config.num_layers,
        "param_gib": sum(x.nbytes for x in jax.tree.leaves(params)) / 2**30,
        "params": config.num_params(),
        "tokens": tokens,
        "first_call_s": compile_s,
        "ms": ms,
        "min_ms": min_ms,
        "attention": case.attention,
        "attention_ms": attention_ms,
        "rest_ms": ms / config.num_layers - attention_ms,
        "peak_gib": stats.get("peak_bytes_in_use", float("nan")) / 2**30,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", nargs="+", default=["1.3b-480p", "14b-720p"], choices=sorted(CASES)
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case")
    parser.add_argument(
        "--impl", default="auto", choices=IMPLS, help="self-attention impl (cudnn on GPU)"
    )
    parser.add_argument(
        "--linear_quant", nargs="+", default=["none"], choices=LINEAR_QUANTS, help="one row each"
    )
    parser.add_argument(
        "--linear_impl", default="cublaslt", choices=FP8_LINEAR_IMPLS, help="FP8 linears' impl"
    )
    parser.add_argument("--batch", type=int, default=1, help="B (2 = the CFG pair)")
    parser.add_argument("--num_layers", type=int, default=None, help="blocks (default: preset's)")
    parser.add_argument(
        "--attention",
        nargs="+",
        default=["dense"],
        help="self-attention of each row: dense or PRESET:PHASE (e.g. wan-720p:2)",
    )
    args = parser.parse_args()
    for spec in args.attention:
        try:
            parse_attention(spec)
        except ValueError as e:
            parser.error(str(e))
    if "fp8" in args.linear_quant:
        try:
            check_backend(args.linear_impl)
        except ValueError as e:
            parser.error(f"--linear_quant fp8: {e}")
    for flag in ("batch", "num_layers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    rows = [
        run_case(
            build_case(
                name, args.impl, quant, args.linear_impl, args.batch, args.num_layers, attention
            ),
            args.repeats,
        )
        for name in args.cases
        for attention in args.attention
        for quant in args.linear_quant
    ]
    print(
        "| case | attention | linear quant | B | layers | params | param GiB | tokens "
        "| ms / forward (median) | ms / layer | attention ms / layer | rest ms / layer | min ms "
        "| first call s | peak GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['attention']} | {r['linear_quant']} | {r['batch']} | "
            f"{r['layers']} | {r['params'] / 1e9:.2f}B | {r['param_gib']:.2f} | {r['tokens']:,} | "
            f"{r['ms']:.1f} | {r['ms'] / r['layers']:.1f} | {r['attention_ms']:.1f} | "
            f"{r['rest_ms']:.1f} | {r['min_ms']:.1f} | {r['first_call_s']:.1f} | "
            f"{r['peak_gib']:.1f} |"
        )


if __name__ == "__main__":
    main()
