"""FP8 error of FPSA with and without `FPSAConfig(smooth_k=True)` (issue 17 item 4), any backend.

The FP8 error of one operator is the relative L2 distance between its FP8 output and the output
of the same operator unquantized (quant "none", same tile and window), so sparsity is not counted.
Random data: q ~ 1.5 N(0, 1) (as DESIGN.md section 5's accuracy row), v ~ N(0, 1), and keys
k = N(0, 1) + offset * mu with one mu ~ N(0, 1) per (head, channel) shared by every token: the
common key offset real attention layers show and that mean-centring removes. offset 0 is the
zero-mean case of DESIGN.md's numbers. Impl "xla" in float32 on a (4, 16, 16) grid (1024 tokens),
4 heads, head dim 64, tile (2, 4, 8).

    python benchmarks/smooth_k_error.py [--offsets 0 1 3] [--seeds 2]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax.attention import FPSAConfig, fpsa_attention

GRID, HEADS, HEAD_DIM, TILE = (4, 16, 16), 4, 64, (2, 4, 8)
WINDOWS = {"full window": None, "window (1, 2, 1)": (1, 2, 1)}


def inputs(seed: int, offset: float):
    kq, kk, kv, km = jax.random.split(jax.random.key(seed), 4)
    shape = (1, int(np.prod(GRID)), HEADS, HEAD_DIM)
    mu = jax.random.normal(km, (1, 1, HEADS, HEAD_DIM))
    q = 1.5 * jax.random.normal(kq, shape)
    k = jax.random.normal(kk, shape) + offset * mu
    return q, k, jax.random.normal(kv, shape)


def fp8_error(q, k, v, window, smooth_k: bool) -> float:
    def run(quant):
        config = FPSAConfig(tile=TILE, window=window, quant=quant, smooth_k=smooth_k)
        return np.asarray(fpsa_attention(q, k, v, grid=GRID, config=config, impl="xla"))

    exact, fp8 = run("none").astype(np.float64), run("fp8").astype(np.float64)
    return float(np.linalg.norm(fp8 - exact) / np.linalg.norm(exact))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offsets", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    parser.add_argument("--seeds", type=int, default=2, help="mean over this many seeds")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; grid {GRID}, {HEADS} heads, "
        f"head dim {HEAD_DIM}, tile {TILE}; FP8 relative L2 against the same operator unquantized"
    )
    print("\n| key offset | operator | smooth_k off | smooth_k on | on / off |")
    print("|---|---|---|---|---|")
    for offset in args.offsets:
        for name, window in WINDOWS.items():
            errs = {
                smooth: np.mean(
                    [fp8_error(*inputs(s, offset), window, smooth) for s in range(args.seeds)]
                )
                for smooth in (False, True)
            }
            ratio = errs[True] / errs[False]
            print(f"| {offset:g} | {name} | {errs[False]:.4f} | {errs[True]:.4f} | {ratio:.2f} |")


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before printing
    main()
