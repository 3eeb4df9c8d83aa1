"""Accuracy of the Triton FPSA kernels at the Wan shapes, against exact attention on sampled rows.

    python benchmarks/kernel_accuracy.py [--shape 1.3B-480p] [--heads 12]

Full-size references do not fit ([L, L] per head), so this computes, for a few query tiles
(first, middle, last: the last has padding holes), exact float32 attention on the kernel's own
quantized inputs Q_hat, K_hat, V_hat over each tile's allowed keys, without P rounding, and the
exact dQ of those rows (dQ_i needs only row i: dS_ij = P_ij (dO_i . v_j - dO_i . o_i)). It prints
relative L2 error and least-squares scale (sum(a b) / sum(b b); 1 means unbiased) of the output
and dQ of `triton` and `xla`. P rounding alone costs ~2% relative L2 and no bias.
"""

from __future__ import annotations

import argparse
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from attention import FULL_SHAPES, TILE, pick_window

from fpsa_jax.attention import FPSAConfig, build_mask_info
from fpsa_jax.attention.kernel_layout import quantize_for_kernel, to_kernel_layout
from fpsa_jax.attention.triton import triton_attention
from fpsa_jax.attention.xla import xla_attention
from pallas_kernels.triton_fpsa_fwd import BLOCK_N

HIGHEST = jax.lax.Precision.HIGHEST


def exact_rows(q_hat, k_hat, v_hat, do, rows, cols, scale):
    """(o, dq) float32 [B, N, R, D] for kernel-layout rows `rows` over key slots `cols`."""
    q, k, v, g = q_hat[:, :, rows], k_hat[:, :, cols], v_hat[:, :, cols], do[:, :, rows]
    s = jnp.einsum("bnqd,bnkd->bnqk", q, k, precision=HIGHEST) * scale
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bnqk,bnkd->bnqd", p, v, precision=HIGHEST)
    dp = jnp.einsum("bnqd,bnkd->bnqk", g, v, precision=HIGHEST)
    ds = p * (dp - jnp.sum(g * o, axis=-1, keepdims=True))
    return o, jnp.einsum("bnqk,bnkd->bnqd", ds, k, precision=HIGHEST) * scale


def compare(a, b) -> str:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    return f"rel L2 {rel:.4f}  scale {a @ b / (b @ b):.4f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="1.3B-480p", choices=[s.name for s in FULL_SHAPES])
    parser.add_argument("--heads", type=int, default=12)
    a = parser.parse_args()
    shape = next(s for s in FULL_SHAPES if s.name == a.shape)
    grid, d = shape.grid, shape.head_dim
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (
        jax.random.normal(kk, (1, shape.tokens, a.heads, d), jnp.bfloat16) for kk in keys
    )
    scale = 1 / math.sqrt(d)
    print(f"device: {jax.devices()[0].device_kind}; {shape.name} heads={a.heads}")
    for window in (None, pick_window(grid, TILE, 0.9)):
        config = FPSAConfig(tile=TILE, window=window, quant="fp8")
        info = build_mask_info(grid, TILE, window)
        ops = quantize_for_kernel(q, k, v, grid, config, block_n=BLOCK_N)
        pp = ops.padded_tile
        valid = np.asarray(ops.key_bias) == 0
        q_hat, k_hat, v_hat = ops.dequantized(jnp.float32)
        do_k = to_kernel_layout(do.astype(jnp.float32), grid, TILE, pp)
        sample = sorted({0, info.n_tiles // 2, info.n_tiles - 1})
        rows = np.concatenate([np.arange(u * pp, (u + 1) * pp) for u in sample])
        rows = rows[valid[rows]]
        refs = []
        for u in sample:
            r = np.arange(u * pp, (u + 1) * pp)
            r = r[valid[r]]
            c = np.concatenate([np.arange(t * pp, (t + 1) * pp) for t in info.kv_tiles[u]])
            refs.append(exact_rows(q_hat, k_hat, v_hat, do_k, r, c[valid[c]], scale))
        o_ref = jnp.concatenate([r[0] for r in refs], axis=2)
        dq_ref = jnp.concatenate([r[1] for r in refs], axis=2)
        print(f"window {window}: {len(rows)} sampled rows of query tiles {sample}")
        for name, impl in (("triton", triton_attention), ("xla", xla_attention)):
            fn = functools.partial(impl, grid=grid, config=config, scale=scale)
            o, pullback = jax.vjp(jax.jit(fn), q, k, v)
            dq = pullback(do)[0]
            o_k = to_kernel_layout(o.astype(jnp.float32), grid, TILE, pp)[:, :, rows]
            dq_k = to_kernel_layout(dq.astype(jnp.float32), grid, TILE, pp)[:, :, rows]
            print(f"  {name:<6} o:  {compare(o_k, o_ref)}")
            print(f"  {name:<6} dq: {compare(dq_k, dq_ref)}")


if __name__ == "__main__":
    main()
