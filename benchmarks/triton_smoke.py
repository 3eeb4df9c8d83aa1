"""Smoke timing of the Triton FP8 block-sparse forward against dense cuDNN bf16 / FP8 (H100).

    python benchmarks/triton_smoke.py [--iters 10] [--warmup 3]

1.3B/480p shape: B = 1, grid (21, 30, 52) (L = 32,760), 12 heads, D = 128, tile (3, 8, 8), bf16
random-normal inputs. Median of --iters synchronised runs after --warmup (compilation included
there). Dense-equivalent TFLOP/s = 4 * B * N * L^2 * D / time; the Triton times include the
XLA pre-pass (tile reorder + FP8 quantization) and the inverse reorder.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
from timing import median_seconds  # benchmarks/timing.py (scripts run from their folder)

from fpsa_jax.attention import FPSAConfig, fpsa_attention
from pallas_kernels.triton_fpsa_fwd import triton_attention

GRID, HEADS, D, TILE = (21, 30, 52), 12, 128, (3, 8, 8)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    a = parser.parse_args()
    length = math.prod(GRID)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (1, length, HEADS, D), jnp.bfloat16) for kk in keys)
    scale = 1 / math.sqrt(D)
    rows = [
        ("cudnn bf16", "dense", None, "cudnn", 1.0),
        ("cudnn fp8", "dense", None, "cudnn_fp8", 1.0),
    ]
    for label, window in (("dense", None), ("~90% sparse", (3, 2, 3))):
        config = FPSAConfig(tile=TILE, window=window, quant="fp8")
        rows.append(("triton fp8", label, config, "triton", config.density(GRID)))
    flops = 4 * length * length * HEADS * D
    base = None
    print(f"device: {jax.devices()[0].device_kind}; L={length}, N={HEADS}, D={D}, tile={TILE}")
    print(f"{'impl':<12} {'window':<12} {'density':>8} {'ms':>9} {'dense TF/s':>11} {'speedup':>8}")
    for impl_label, label, config, impl, density in rows:
        if impl == "triton":
            fn = jax.jit(
                lambda q, k, v, c=config: triton_attention(
                    q, k, v, grid=GRID, config=c, scale=scale
                )
            )
        else:
            fn = jax.jit(
                lambda q, k, v, i=impl: fpsa_attention(
                    q, k, v, grid=GRID, config=None, impl=i, scale=scale
                )
            )
        try:
            t = median_seconds(fn, (q, k, v), a.warmup, a.iters)
        except Exception as e:  # report and go on: one failing impl should not hide the rest
            print(f"{impl_label:<12} {label:<12} failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        base = base or t
        print(
            f"{impl_label:<12} {label:<12} {density:>8.3f} {t * 1e3:>9.3f} "
            f"{flops / t / 1e12:>11.1f} {base / t:>7.2f}x"
        )


if __name__ == "__main__":
    main()
