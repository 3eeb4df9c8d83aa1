"""One Wan2.1 DiT forward on a GPU: ms per forward and peak device memory.

Random bf16 weights (the head randomised too, so no output is trivially zero), random latents,
timesteps and text, dense cuDNN bf16 self-attention. Median of timed runs after a warm-up, each
synchronised with block_until_ready.

    python benchmarks/dit_forward.py                       # 1.3B/480p and 14B/720p
    python benchmarks/dit_forward.py --cases tiny-cpu      # smoke test anywhere
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from fpsa_jax.attention import IMPLS, Impl
from fpsa_jax.config import WanConfig
from fpsa_jax.model.random_weights import random_weights
from fpsa_jax.model.wan import WanModel, init_params

# name: (preset, frames, latent H, latent W) -- 81 frames -> 21 latent frames; pixels / 8.
CASES = {
    "1.3b-480p": ("t2v-1.3b", 21, 60, 104),
    "14b-720p": ("t2v-14b", 21, 90, 160),
    "tiny-cpu": ("tiny", 3, 16, 16),
}


def run_case(name: str, repeats: int, impl: Impl) -> dict:
    preset, f, h, w = CASES[name]
    config = WanConfig.preset(preset, dtype="bfloat16", param_dtype="bfloat16")
    key = jax.random.key(0)
    params = random_weights(functools.partial(init_params, config), key)
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    latents = jax.random.normal(k1, (1, f, h, w, config.in_dim), jnp.float32)
    timesteps = jax.random.uniform(k2, (1,), jnp.float32, 0, 1000)
    context = jax.random.normal(k3, (1, config.text_len, config.text_dim), jnp.bfloat16)
    model = WanModel(config, attention_impl=impl)
    forward = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))

    start = time.perf_counter()
    out = jax.block_until_ready(forward(params, latents, timesteps, context))
    compile_s = time.perf_counter() - start
    assert bool(jnp.isfinite(out).all()), "non-finite output"
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(forward(params, latents, timesteps, context))
        times.append(time.perf_counter() - start)
    stats = jax.devices()[0].memory_stats() or {}
    tokens = f * (h // 2) * (w // 2)
    return {
        "case": name,
        "params": config.num_params(),
        "tokens": tokens,
        "first_call_s": compile_s,
        "ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
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
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    rows = [run_case(name, args.repeats, args.impl) for name in args.cases]
    print("| case | params | tokens | ms / forward (median) | min ms | first call s | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['params'] / 1e9:.2f}B | {r['tokens']:,} | {r['ms']:.1f} | "
            f"{r['min_ms']:.1f} | {r['first_call_s']:.1f} | {r['peak_gib']:.1f} |"
        )


if __name__ == "__main__":
    main()
