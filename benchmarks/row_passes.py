"""Time the DiT's fused per-token Triton passes at its shapes, each variant in one run.

    python benchmarks/row_passes.py [--presets t2v-14b-720p t2v-1.3b-480p] [--iters 20]

Per preset, on random data shaped like one layer at B = 2 (the CFG pair), the passes of
`pallas_kernels.triton_row_quant`: LayerNorm + modulation -> E4M3 (the q/k/v and fc1 inputs,
K = dim) at 1, 2 and 4 rows per program; fc1's GEMM sums -> GELU -> E4M3 (fc2's input,
K = ffn_dim) with each way of finding its absmax ("from_max", the default, at 1, 2 and 4 rows per
program, and "walk"); the plain quantize (the o input); and `pallas_kernels.triton_rms_rope`: the
FP8 q projection's GEMM sums -> epilogue -> RMSNorm -> RoPE -> bf16. Prints milliseconds (median
of --iters synchronised calls after --warmup) and the effective bandwidth of the bytes each must
move (input once, output once), and for the GELU pass the fraction of E4M3 values on which the
two ways agree. Needs a GPU with jax-triton.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from timing import median_seconds  # benchmarks/timing.py (scripts run from their folder)

from pallas_kernels.triton_rms_rope import rms_norm_rope
from pallas_kernels.triton_row_quant import GELU_ABSMAX, quantize_rows

# (tokens per video, dim, ffn_dim) of each model at its resolution (REFERENCE.md); head dim 128.
PRESETS = {
    "t2v-14b-720p": (75600, 5120, 13824),
    "t2v-1.3b-480p": (32760, 1536, 8960),
}
HEAD_DIM = 128
ROWS_PER_PROGRAM = (1, 2, 4)


def cases(tokens: int, dim: int, ffn: int, key):
    """name -> (fn, args, bytes moved) for one preset at B = 2."""
    ks = jax.random.split(key, 6)
    rows = 2 * tokens
    normed_in = jax.random.normal(ks[0], (2, tokens, dim), jnp.bfloat16)
    mul = 1 + 0.3 * jax.random.normal(ks[1], (2, dim), jnp.float32)
    add = 0.1 * jax.random.normal(ks[2], (2, dim), jnp.float32)
    # fc1's bfloat16 GEMM sums with FP8-like scales: u = sums * row * col + bias ~ N(0, ~1).
    sums = (40 * jax.random.normal(ks[3], (rows, ffn), jnp.float32)).astype(jnp.bfloat16)
    row_scale = jnp.full((rows,), 0.05, jnp.float32)
    col_scale = jnp.exp(jax.random.normal(ks[4], (ffn,), jnp.float32) - 3.0)
    bias = jax.random.normal(ks[5], (ffn,), jnp.float32)
    out = lambda m, k: m * k + 4 * m  # noqa: E731 (E4M3 values + float32 scales)
    found = {}
    for n in ROWS_PER_PROGRAM:  # " (1 rows)" etc.: rows walked together by one program
        found[f"layernorm ({n} rows)"] = (
            jax.jit(
                lambda x, m, a, n=n: quantize_rows(
                    x, "layernorm", m, a, eps=1e-6, rows_per_program=n
                )
            ),
            (normed_in, mul, add),
            2 * rows * dim + out(rows, dim),
        )
    found["none"] = (
        jax.jit(lambda x: quantize_rows(x, "none")),
        (normed_in,),
        2 * rows * dim + out(rows, dim),
    )
    for way in GELU_ABSMAX:
        for n in ROWS_PER_PROGRAM if way == "from_max" else (1,):
            fn = jax.jit(
                lambda x, r, c, b, way=way, n=n: quantize_rows(
                    x, "gelu", r, c, b, gelu_absmax=way, rows_per_program=n
                )
            )
            found[f"gelu ({way}, {n} rows)"] = (
                fn,
                (sums, row_scale, col_scale, bias),
                2 * rows * ffn + out(rows, ffn),
            )
    # The q projection's FP8 GEMM sums, its scales and bias, the norm's weight, RoPE's tables.
    ks = jax.random.split(ks[5], 4)
    q_sums = (40 * jax.random.normal(ks[0], (2, tokens, dim), jnp.float32)).astype(jnp.bfloat16)
    q_bias = 0.1 * jax.random.normal(ks[1], (dim,), jnp.float32)
    q_col = jnp.exp(jax.random.normal(ks[2], (dim,), jnp.float32) - 3.0)
    q_row = jnp.full((2, tokens, 1), 0.05, jnp.float32)
    weight = 1 + 0.1 * jax.random.normal(ks[3], (dim,), jnp.float32)
    angles = jnp.arange(tokens, dtype=jnp.float32)[:, None] * jnp.linspace(0, 1, HEAD_DIM // 2)
    found["rms_norm_rope"] = (
        jax.jit(
            lambda x, b, r, c, w, cos, sin: rms_norm_rope(
                x, w, 1e-6, cos, sin, bias=b, row_scale=r, col_scale=c, head_dim=HEAD_DIM
            )
        ),
        (q_sums, q_bias, q_row, q_col, weight, jnp.cos(angles), jnp.sin(angles)),
        4 * rows * dim,
    )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--iters", type=int, default=20, help="timed calls per pass (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        parser.error(f"it times Triton kernels on a GPU; the backend is {jax.default_backend()}")
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}")
    table = []
    for preset in args.presets:
        tokens, dim, ffn = PRESETS[preset]
        found = cases(tokens, dim, ffn, jax.random.key(0))
        for name, (fn, fn_args, moved) in found.items():
            seconds = median_seconds(fn, fn_args, args.warmup, args.iters)
            table.append((preset, name, seconds * 1e3, moved / seconds / 1e12))
        bits = [
            jax.lax.bitcast_convert_type(fn(*fn_args)[0], jnp.uint8)
            for fn, fn_args, _ in (found[f"gelu ({way}, 1 rows)"] for way in GELU_ABSMAX)
        ]
        agree = float(jnp.mean(bits[0] == bits[1]))
        print(f"{preset}: GELU pass, E4M3 values equal between the two absmax ways: {agree:.6f}")
    print("\n| preset | pass | ms | effective TB/s |\n|---|---|---|---|")
    for preset, name, ms, tbs in table:
        print(f"| {preset} | {name} | {ms:.3f} | {tbs:.2f} |")


if __name__ == "__main__":
    main()
