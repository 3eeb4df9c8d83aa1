"""Launch-parameter sweep of the Triton FPSA kernels, kernel time only (H100).

    python benchmarks/kernel_tuning.py [--shape 1.3B-480p] [--iters 10] [--warmup 2]

Times the forward kernel (`pallas_kernels.triton_fpsa_fwd`) and the two backward kernels
(`pallas_kernels.triton_fpsa_bwd`) on pre-passed random operands, for each launch configuration, at
the full window and at ~90% sparsity; also the pre-pass alone, by each of `PREPASSES`, and with
--prepass-sweep the Triton pre-pass kernel alone per scale mode and `PrepassLaunch`, and V's
channel absmax by XLA and by the Triton `channel_absmax` per step shape. Prints one
table; the fastest launches become the defaults in the kernel modules (see benchmarks/RESULTS.md).
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
from fpsa_jax.attention.kernel_layout import (
    PREPASSES,
    kernel_scales,
    key_block_list,
    padded_tile_length,
    quantize_for_kernel,
    slot_tokens,
)
from fpsa_jax.attention.quant import finite_abs
from pallas_kernels import triton_fpsa_prepass as tp
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
    parser.add_argument(
        "--prepass-sweep",
        action="store_true",
        help="also time the Triton pre-pass kernel alone per scale mode and launch",
    )
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
    if a.prepass_sweep:
        prepass_sweep(shape, tile, q, v, a)
        channel_absmax_sweep(v, a)
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


def prepass_sweep(shape, tile, q, v, a):
    """The Triton pre-pass kernel alone on Q (given tile scales; finding them) and V (channel
    scales, transposed), for each `PrepassLaunch`: ms and the bytes it must move per second."""
    config = FPSAConfig(tile=tile, quant="fp8")
    pp = padded_tile_length(math.prod(tile), BLOCK_N)
    table = slot_tokens(shape.grid, tile, pp)
    q_scale, _, v_scale = jax.jit(lambda q, v: kernel_scales(q, q, v, shape.grid, config))(q, v)
    moved = q.size * q.dtype.itemsize + table.size * q.shape[2] * q.shape[3]  # bf16 in, E4M3 out
    modes = {
        "tile": lambda x, launch: tp.relayout(
            x, q_scale, table, padded_tile=pp, scale_mode="tile", launch=launch
        ),
        "tile_absmax": lambda x, launch: tp.relayout_with_tile_scales(
            x, table, padded_tile=pp, launch=launch
        ),
        "channel": lambda x, launch: tp.relayout(
            x, v_scale, table, padded_tile=pp, scale_mode="channel", transposed=True, launch=launch
        ),
    }
    sweep = itertools.product(modes.items(), (16, 32, 64), (4, 8), (False, True))
    for (mode, fn), block_p, warps, unroll in sweep:
        if unroll and mode != "tile_absmax":
            continue  # only "tile_absmax" walks a tile in steps
        launch = tp.PrepassLaunch(block_p=block_p, num_warps=warps, unroll_walks=unroll)
        run = jax.jit(functools.partial(fn, launch=launch))
        t = median_seconds(run, (v if mode == "channel" else q,), a.warmup, a.iters)
        label = f"{mode} p{block_p} w{warps}" + (" unrolled" if unroll else "")
        print(f"{'prepass':<8} {'-':<11} {label:<34} {t * 1e3:>8.3f} {moved / t / 1e12:>6.2f} TB/s")


def channel_absmax_sweep(v, a):
    """V's channel absmax by XLA (what `kernel_layout` uses) and by the Triton `channel_absmax`
    per step shape: ms, and whether the values are XLA's."""
    xla = jax.jit(lambda v: jnp.max(finite_abs(v), axis=1))
    want = xla(v)
    fns = {"xla": xla}
    for block_l, unroll in ((16, 1), (16, 2), (8, 1), (8, 4)):
        fns[f"triton l{block_l} x{unroll}"] = jax.jit(
            functools.partial(tp.channel_absmax, block_l=block_l, unroll=unroll)
        )
    moved = v.size * v.dtype.itemsize  # one read of V
    for label, fn in fns.items():
        same = bool(jnp.array_equal(fn(v), want))
        t = median_seconds(fn, (v,), a.warmup, a.iters)
        line = f"{t * 1e3:>8.3f} {moved / t / 1e12:>6.2f} TB/s, same values: {same}"
        print(f"{'v absmax':<8} {'-':<11} {label:<34} {line}")


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
