"""Correctness and launch sweep of the Mosaic GPU FPSA forward against Triton and cuDNN (H100/H200).

    python benchmarks/mosaic_tuning.py [--shapes 1.3B-480p 14B-720p] [--iters 10] [--warmup 2]
                                       [--no-check] [--sweep-windows 0.9]

1. Check (unless --no-check): `impl="mosaic"` against `impl="xla"` (the same quantization, P
   rounded against the final instead of the running max) at small odd grids, B = 2, FP8 and bf16,
   dense and windowed; and against the Triton forward at the first shape's 90% window. Prints the
   relative L2 error of each (FP8: ~2% is P's rounding; bf16: ~0.3%).
2. Timing, per shape: cuDNN bf16 and FP8 (dense), then for the full window and ~50/75/90% sparsity
   the Triton forward kernel and the Mosaic forward kernel on the same pre-passed operands (kernel
   time only, both storing token order; the Mosaic default also as kernel layout + XLA's reorder),
   the Mosaic kernel with its default launch (what impl="mosaic" runs) and, at the
   --sweep-windows sparsities, with each launch of `LAUNCHES`, and the whole `mosaic` and
   `triton` impls (pre-pass included) at 90%.
   Medians of --iters synchronised runs after --warmup; speedup is against cuDNN bf16 in the same
   run; effective TFLOP/s counts 4 * B * N * L^2 * D * density.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from attention import FULL_SHAPES, TARGET_SPARSITIES, TILE, pick_window
from timing import median_seconds  # benchmarks/timing.py (scripts run from their folder)

from fpsa_jax.attention import FPSAConfig, build_mask_info, fpsa_attention
from fpsa_jax.attention.kernel_layout import (
    key_block_list,
    key_block_valid_slots,
    output_from_kernel,
    quantize_for_kernel,
    slot_tokens,
)
from pallas_kernels import mosaic_fpsa_fwd, triton_fpsa_fwd

Launch = mosaic_fpsa_fwd.MosaicLaunch
LAUNCHES = (
    Launch(),
    Launch(skip_padding_rows=True),
    Launch(lazy_rescale=True, p_in_registers=True, skip_padding_rows=True),
    Launch(pingpong=True, lazy_rescale=True, p_in_registers=True),
    Launch(pingpong=True, lazy_rescale=True, p_in_registers=True, skip_padding_rows=True),
    Launch(pingpong=True, lazy_rescale=True, skip_padding_rows=True),
)  # each sweep also times `default_launch` (the row above it with one persistent CTA per SM)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def attend(impl, grid, config, q, k, v):
    fn = lambda q, k, v: fpsa_attention(q, k, v, grid=grid, config=config, impl=impl)
    return jax.jit(fn)(q, k, v)


def check(shape) -> None:
    print("## check: mosaic against xla (same quantization) and triton")
    cases = [
        ((5, 20, 28), (1, 2, 2), "fp8"),
        ((5, 20, 28), None, "fp8"),
        ((4, 10, 12), (2, 1, 3), "none"),
        ((3, 8, 8), None, "none"),
    ]
    for grid, window, quant in cases:
        cfg = FPSAConfig(tile=TILE, window=window, quant=quant)
        keys = jax.random.split(jax.random.key(1), 3)
        q, k, v = (jax.random.normal(kk, (2, math.prod(grid), 3, 128), jnp.bfloat16) for kk in keys)
        mos, ref = (attend(impl, grid, cfg, q, k, v) for impl in ("mosaic", "xla"))
        finite = bool(np.isfinite(np.asarray(mos, np.float32)).all())
        print(
            f"grid {grid} window {window} {quant}: rel err {rel_err(mos, ref):.4f} finite {finite}"
        )
    grid, heads = shape.grid, shape.heads
    cfg = FPSAConfig(tile=TILE, window=pick_window(grid, TILE, 0.9), quant="fp8")
    keys = jax.random.split(jax.random.key(2), 3)
    q, k, v = (jax.random.normal(kk, (1, shape.tokens, heads, 128), jnp.bfloat16) for kk in keys)
    mos, tri = (attend(impl, grid, cfg, q, k, v) for impl in ("mosaic", "triton"))
    print(f"{shape.name} {cfg.window} fp8 mosaic vs triton: rel err {rel_err(mos, tri):.4f}")


def kernel_calls(ops, info, scale, config, launches):
    """{name: (fn, args)} for the Triton and Mosaic forward kernels on pre-passed operands, both
    writing token order; the Mosaic kernel for each launch (valid-slot table, token-order
    store), and the default launch writing the kernel layout + XLA's reorder (the old form)."""
    valid = key_block_valid_slots(ops.grid, ops.tile, ops.padded_tile, 64)
    tokens = slot_tokens(ops.grid, ops.tile, ops.padded_tile)
    args = (ops.q, ops.k, ops.v_t, ops.q_scale, ops.k_scale, ops.v_scale, ops.key_bias)
    common = dict(
        padded_tile=ops.padded_tile,
        scale=scale,
        p_scale=config.scale if config.quant == "fp8" else 1.0,
        out_dtype=jnp.bfloat16,
    )
    blocks = key_block_list(ops.grid, ops.tile, info.window, ops.padded_tile, 64)
    triton_fwd = lambda *a: triton_fpsa_fwd.fpsa_forward(
        *a, blocks.blocks, blocks.count, slot_token=tokens, **common
    )
    calls = {"triton kernel": (jax.jit(triton_fwd), args)}
    for launch in launches:
        fn = jax.jit(
            lambda *a, launch=launch: mosaic_fpsa_fwd.fpsa_forward(
                *a, blocks.blocks, blocks.count, launch=launch, valid_slots=valid,
                slot_token=tokens, **common,
            )
        )  # fmt: skip
        calls[f"mosaic kernel {launch_name(launch)}"] = (fn, args)

    def reordered(*a):
        o, lse = mosaic_fpsa_fwd.fpsa_forward(
            *a, blocks.blocks, blocks.count, valid_slots=valid, **common
        )
        return output_from_kernel(o, ops), lse

    calls["mosaic kernel default, kernel layout + XLA reorder"] = (jax.jit(reordered), args)
    return calls


def launch_name(launch) -> str:
    """The launch's fields that differ from the default (or 'default')."""
    default = Launch()
    changed = [
        f"{f.name}={getattr(launch, f.name)}"
        for f in dataclasses.fields(launch)
        if getattr(launch, f.name) != getattr(default, f.name)
    ]
    return ", ".join(changed) or "default"


def time_shape(shape, args) -> None:
    b, n, d, length = shape.batch, shape.heads, shape.head_dim, shape.tokens
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (b, length, n, d), jnp.bfloat16) for kk in keys)
    flops = 4 * b * n * length * length * d
    scale = 1 / math.sqrt(d)

    def report(label, density, t, base):
        eff = flops * density / t / 1e12
        cells = (
            shape.name,
            label,
            f"{density:.3f}",
            f"{t * 1e3:.3f}",
            f"{eff:.0f}",
            f"{base / t:.2f}",
        )
        print("| " + " | ".join(cells) + " |")

    print(f"\n## {shape.name} B{b} L{length} N{n} D{d}")
    print("| shape | what | density | ms | effective TFLOP/s | x cuDNN bf16 |")
    print("|---|---|---|---|---|---|")
    dense = {}
    for impl in ("cudnn", "cudnn_fp8"):
        fn = jax.jit(lambda q, k, v, impl=impl: fpsa_attention(q, k, v, grid=shape.grid, impl=impl))
        dense[impl] = median_seconds(fn, (q, k, v), args.warmup, args.iters)
    base = dense["cudnn"]
    for impl, t in dense.items():
        report(impl, 1.0, t, base)
    windows = [(None, 0.0)] + [(pick_window(shape.grid, TILE, s), s) for s in TARGET_SPARSITIES]
    for window, sparsity in windows:
        config = FPSAConfig(tile=TILE, window=window, quant="fp8")
        info = build_mask_info(shape.grid, TILE, window)
        density = config.density(shape.grid)
        ops = jax.jit(
            lambda q, k, v, config=config: quantize_for_kernel(
                q, k, v, shape.grid, config, block_n=64, prepass="triton"
            )
        )(q, k, v)
        default = mosaic_fpsa_fwd.default_launch(ops.padded_tile, d, ops.q.dtype, jnp.bfloat16)
        launches = (default, *LAUNCHES) if sparsity in args.sweep_windows else (default,)
        calls = kernel_calls(ops, info, scale, config, launches)
        triton_out = None
        for name, (fn, fn_args) in calls.items():
            try:
                t = median_seconds(fn, fn_args, args.warmup, args.iters)
                out = np.asarray(fn(*fn_args)[0], np.float32)
            except Exception as e:  # noqa: BLE001 - report and go on with the other rows
                print(f"FAILED {name} {window}: {type(e).__name__}: {str(e)[:2000]}")
                continue
            if triton_out is None:
                triton_out = out
            err = rel_err(out, triton_out)
            report(f"{name} {window} (rel. diff to triton {err:.4f})", density, t, base)
        if sparsity == max(TARGET_SPARSITIES):
            for impl in ("triton", "mosaic"):
                fn = jax.jit(
                    lambda q, k, v, impl=impl, config=config: fpsa_attention(
                        q, k, v, grid=shape.grid, config=config, impl=impl
                    )
                )
                t = median_seconds(fn, (q, k, v), args.warmup, args.iters)
                report(f"impl={impl} {window} (pre-pass included)", density, t, base)


def profile_once(shape) -> None:
    """The Mosaic forward kernel with its default launch (`default_launch`, what impl="mosaic"
    runs) once at the shape's 90% window (for ncu)."""
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (
        jax.random.normal(kk, (1, shape.tokens, shape.heads, 128), jnp.bfloat16) for kk in keys
    )
    config = FPSAConfig(tile=TILE, window=pick_window(shape.grid, TILE, 0.9), quant="fp8")
    info = build_mask_info(shape.grid, TILE, config.window)
    ops = quantize_for_kernel(q, k, v, shape.grid, config, block_n=64, prepass="xla")
    launch = mosaic_fpsa_fwd.default_launch(ops.padded_tile, 128, ops.q.dtype, jnp.bfloat16)
    calls = kernel_calls(ops, info, 1 / math.sqrt(128), config, (launch,))
    fn, args = calls[f"mosaic kernel {launch_name(launch)}"]
    jax.block_until_ready(fn(*args))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=[s.name for s in FULL_SHAPES])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--sweep-windows", type=float, nargs="*", default=[0.0, 0.9])
    p.add_argument(
        "--profile-once", action="store_true", help="one kernel call (for ncu), then exit"
    )
    args = p.parse_args()
    shapes = [s for s in FULL_SHAPES if s.name in args.shapes]
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    if args.profile_once:
        profile_once(shapes[0])
        return
    if not args.no_check:
        check(shapes[0])
    for shape in shapes:
        time_shape(shape, args)


if __name__ == "__main__":
    main()
