"""Launch-parameter sweep of the Triton FPSA kernels, kernel time only (H100).

    python benchmarks/kernel_tuning.py [--shape 1.3B-480p] [--iters 10] [--warmup 2]

Times the forward kernel (`pallas_kernels.triton_fpsa_fwd`) and the two backward kernels
(`pallas_kernels.triton_fpsa_bwd`) on pre-passed random operands, for each launch configuration, at
the full window and at ~90% sparsity; also the pre-pass alone, XLA and Triton. Prints one table;
the fastest launches become the defaults in the kernel modules (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math

import jax
import jax.numpy as jnp
from attention import FULL_SHAPES, TILE, pick_window
from timing import median_seconds  # benchmarks/timing.py (scripts run from their folder)

from fpsa_jax.attention import FPSAConfig, build_mask_info
from fpsa_jax.attention.kernel_layout import PREPASSES, key_block_list, quantize_for_kernel
from pallas_kernels.triton_fpsa_bwd import BackwardLaunch, fpsa_backward
from pallas_kernels.triton_fpsa_fwd import BLOCK_N, LaunchConfig, fpsa_forward


def forward_launches(pp):
    blocks = [(64, 64)] + ([(128, 64), (128, 128)] if pp % 128 == 0 else [])
    return [
        LaunchConfig(block_m=m, block_n=n, num_warps=4 if m == 64 else 8, num_stages=s)
        for (m, n), s in itertools.product(blocks, (2, 3))
    ]


def backward_launches(pp):
    blocks = [(64, 64)] + ([(128, 64), (64, 128)] if pp % 128 == 0 else [])
    return [
        BackwardLaunch(block_m=m, block_n=n, num_warps=w, num_stages=2)
        for (m, n), w in itertools.product(blocks, (4, 8))
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="1.3B-480p", choices=[s.name for s in FULL_SHAPES])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip-backward", action="store_true")
    parser.add_argument("--tile", type=int, nargs=3, default=TILE, help="the 3D tile (tokens)")
    parser.add_argument("--windows", choices=["both", "sparse"], default="both")
    a = parser.parse_args()
    shape = next(s for s in FULL_SHAPES if s.name == a.shape)
    length, heads, d = shape.tokens, shape.heads, shape.head_dim
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(kk, (1, length, heads, d), jnp.bfloat16) for kk in keys)
    scale = 1 / math.sqrt(d)
    fwd_flops = 4 * length * length * heads * d
    print(f"device: {jax.devices()[0].device_kind}; {shape.name} L={length} N={heads} D={d}")
    print(f"{'kernel':<8} {'window':<11} {'launch':<34} {'ms':>8} {'eff TF/s':>9}")

    tile = tuple(a.tile)
    windows = [pick_window(shape.grid, tile, 0.9)]
    windows = windows if a.windows == "sparse" else [None, *windows]
    print(f"tile {tile}")
    for window in windows:
        config = FPSAConfig(tile=tile, window=window, quant="fp8")
        info = build_mask_info(shape.grid, tile, window)
        density = config.density(shape.grid)
        for kind in PREPASSES:
            prepass = jax.jit(
                functools.partial(prepass_fn, grid=shape.grid, config=config, prepass=kind)
            )
            ops = prepass(q, k, v)
            t = median_seconds(prepass, (q, k, v), a.warmup, a.iters)
            print(f"{'prepass':<8} {str(window):<11} {kind:<34} {t * 1e3:>8.3f} {'':>9}")
        args = (ops.q, ops.k, ops.v_t, ops.q_scale, ops.k_scale, ops.v_scale, ops.key_bias)
        for launch in forward_launches(ops.padded_tile):
            fn = jax.jit(forward_fn(info, ops.padded_tile, scale, launch))
            report("fwd", window, launch, fn, args, fwd_flops * density, a)
        if a.skip_backward:
            continue
        o, lse = jax.jit(forward_fn(info, ops.padded_tile, scale, None))(*args)
        q_hat, k_hat, v_hat = jax.jit(lambda ops: ops.dequantized(jnp.bfloat16))(ops)
        do_k = jax.random.normal(keys[3], o.shape, jnp.bfloat16)
        delta = jnp.sum(do_k.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
        bwd_args = (q_hat, k_hat, v_hat, do_k, lse, delta, ops.key_bias)
        for launch in backward_launches(ops.padded_tile):
            fn = jax.jit(backward_fn(info, ops.padded_tile, scale, launch))
            report("bwd", window, launch, fn, bwd_args, 2.5 * fwd_flops * density, a)


def prepass_fn(q, k, v, *, grid, config, prepass):
    return quantize_for_kernel(q, k, v, grid, config, block_n=BLOCK_N, prepass=prepass)


def forward_fn(info, padded_tile, scale, launch):
    blocks = key_block_list(info.grid, info.tile, info.window, padded_tile, BLOCK_N)
    return lambda *ops: fpsa_forward(
        *ops,
        blocks.blocks,
        blocks.count,
        padded_tile=padded_tile,
        scale=scale,
        p_scale=448.0,
        out_dtype=jnp.bfloat16,
        launch=launch,
    )


def backward_fn(info, padded_tile, scale, launch):
    return lambda *args: fpsa_backward(
        *args,
        info.kv_tiles,
        info.q_tiles,
        info.q_count,
        padded_tile=padded_tile,
        scale=scale,
        launch=launch,
    )


def report(name, window, launch, fn, args, flops, a):
    label = f"m{launch.block_m} n{launch.block_n} w{launch.num_warps} s{launch.num_stages}"
    try:
        t = median_seconds(fn, args, a.warmup, a.iters)
    except Exception as e:  # noqa: BLE001 - one launch failing to compile must not hide the rest
        print(f"{name:<8} {str(window):<11} {label:<34} failed: {type(e).__name__}: {str(e)[:120]}")
        return
    print(
        f"{name:<8} {str(window):<11} {label:<34} {t * 1e3:>8.3f} {flops / t / 1e12:>9.1f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
