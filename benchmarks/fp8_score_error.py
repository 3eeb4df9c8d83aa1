"""How the FP8 error of `fpsa_attention` depends on the size of the attention scores (CPU).

    python benchmarks/fp8_score_error.py [--seeds 3]

q, k, v standard normal [1, L, N, D]; q multiplied by c so the logits q.k / sqrt(D) have
standard deviation c. Prints, per c, the relative L2 error of the FP8 output (the `reference` and
`xla` impls) against the same operator without quantization (quant "none", float32), mean over
seeds: full window, and a window keeping a quarter of the key tiles. The numbers are quoted in
`fpsa_attention`'s docstring.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax.attention import FPSAConfig, fpsa_attention

GRID = (4, 8, 16)  # L = 512 tokens
HEADS, HEAD_DIM = 2, 64
TILE = (2, 4, 4)  # tile grid (2, 2, 4) = 16 tiles
WINDOWS = {"full window": None, "25% of the tiles": (1, 2, 2)}
SCALES = (0.5, 1.0, 2.0, 4.0, 8.0)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    shape = (1, int(np.prod(GRID)), HEADS, HEAD_DIM)
    print(
        f"grid {GRID}, tile {TILE}, N={HEADS}, D={HEAD_DIM}, {args.seeds} seeds, {jax.devices()[0]}"
    )
    print("window            impl       " + "  ".join(f"c={c:<5g}" for c in SCALES))
    for name, window in WINDOWS.items():
        fp8 = FPSAConfig(tile=TILE, window=window, quant="fp8")
        exact = FPSAConfig(tile=TILE, window=window, quant="none")
        for impl in ("reference", "xla"):
            errors = []
            for c in SCALES:
                per_seed = []
                for seed in range(args.seeds):
                    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
                    q = c * jax.random.normal(kq, shape, jnp.float32)
                    k = jax.random.normal(kk, shape, jnp.float32)
                    v = jax.random.normal(kv, shape, jnp.float32)
                    with jax.default_matmul_precision("highest"):
                        ref = fpsa_attention(q, k, v, grid=GRID, config=exact, impl="reference")
                        out = fpsa_attention(q, k, v, grid=GRID, config=fp8, impl=impl)
                    per_seed.append(rel_l2(out, ref))
                errors.append(np.mean(per_seed))
            print(f"{name:<17} {impl:<10} " + "  ".join(f"{e:7.2%}" for e in errors))


if __name__ == "__main__":
    main()
