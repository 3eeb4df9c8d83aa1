"""Training step time, tokens/s and model FLOPs utilisation of the Wan2.1 DiT on one GPU.

The real step (`fpsa_jax.training.train_step`: bf16 compute from float32 master weights, AdamW,
EMA, remat per block) on random weights and random latents/text, B=1. Modes:
  dense  attention=None through cuDNN (`impl="auto"` on a GPU)
  fpsa   one phase of the resolution's StepSchedule preset (--phase) through --fpsa_impl
MFU counts the dense model's FLOPs (forward x 3, no remat recompute) over the step time and the
H100 SXM's 989 TFLOP/s dense bf16 peak, so FPSA rows show useful work per second.

    python benchmarks/train_step.py                                    # 1.3B, 832*480, 81 frames
    python benchmarks/train_step.py --preset tiny --size 64*64 --frame_num 9 --repeats 2   # CPU
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from fpsa_jax import pipeline
from fpsa_jax.attention import IMPLS, StepSchedule
from fpsa_jax.config import WanConfig
from fpsa_jax.model.random_weights import random_weights
from fpsa_jax.model.wan import init_params
from fpsa_jax.training import TrainConfig, init_train_state, train_step

H100_BF16_PEAK = 989e12


def forward_flops(config: WanConfig, tokens: int) -> float:
    """Matmul FLOPs of one DiT forward (B=1): linear layers + self- and cross-attention."""
    d, layers = config.dim, config.num_layers
    per_token_linear = 2 * layers * (4 * d * d + 2 * d * d + 2 * d * config.ffn_dim)
    self_attn = 4 * layers * tokens * tokens * d
    cross_kv = 4 * layers * config.text_len * d * d  # K and V of the text rows
    cross_attn = 4 * layers * tokens * config.text_len * d
    return per_token_linear * tokens + self_attn + cross_kv + cross_attn


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="t2v-1.3b")
    parser.add_argument("--size", default="832*480")
    parser.add_argument("--frame_num", type=int, default=81)
    parser.add_argument("--remat", default="full")
    parser.add_argument("--modes", nargs="+", default=["dense", "fpsa"])
    parser.add_argument("--fpsa_impl", default="xla", choices=IMPLS)
    parser.add_argument("--phase", type=int, default=1, help="schedule phase for the fpsa mode")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up")
    args = parser.parse_args()

    width, height = (int(s) for s in args.size.split("*"))
    shape = pipeline.latent_shape(1, width, height, args.frame_num)
    config = WanConfig.preset(args.preset, remat=args.remat)
    tokens = shape[1] * (shape[2] // 2) * (shape[3] // 2)
    schedule = StepSchedule.preset("wan-480p" if width * height <= 832 * 480 else "wan-720p")
    train_config = TrainConfig(warmup_steps=1)
    key = jax.random.key(0)
    params = random_weights(functools.partial(init_params, config), key)
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    batch = {
        "latents": jax.random.normal(k1, shape, jnp.float32),
        "context": jax.random.normal(k2, (1, config.text_len, config.text_dim), jnp.bfloat16),
        "sigmas": jax.random.uniform(k3, (1,), jnp.float32, 0.05, 0.95),
    }
    flops = 3 * forward_flops(config, tokens)
    print(
        f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; {args.preset} "
        f"{args.size} x {args.frame_num} frames = {tokens:,} tokens, remat {args.remat}"
    )

    rows = []
    for mode in args.modes:
        attention = None if mode == "dense" else schedule.phases[args.phase].config
        impl = "auto" if mode == "dense" else args.fpsa_impl
        state = jax.jit(functools.partial(init_train_state, config, train_config))(params, key)
        step = jax.jit(
            functools.partial(
                train_step,
                model_config=config,
                train_config=train_config,
                attention=attention,
                impl=impl,
            ),
            donate_argnums=0,
        )
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        first = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        assert bool(jnp.isfinite(metrics["loss"])), "non-finite loss"
        t = statistics.median(times)
        density = (
            1.0
            if attention is None
            else attention.density((shape[1], shape[2] // 2, shape[3] // 2))
        )
        stats = jax.devices()[0].memory_stats() or {}
        rows.append(
            (
                mode,
                impl,
                density,
                first,
                t,
                tokens / t,
                flops / t / H100_BF16_PEAK,
                stats.get("peak_bytes_in_use", float("nan")) / 2**30,
            )
        )
        print(f"{mode}: first step {first:.1f} s, steps {[round(x, 3) for x in times]}", flush=True)
        del state

    print(
        "\n| mode | impl | attention density | first step s (compile) | step s (median) | "
        "tokens/s | MFU (dense FLOPs) | peak GiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for mode, impl, density, first, t, tps, mfu, peak in rows:
        print(
            f"| {mode} | {impl} | {density:.2f} | {first:.1f} | {t:.3f} | {tps:,.0f} | "
            f"{100 * mfu:.1f}% | {peak:.1f} |"
        )


if __name__ == "__main__":
    main()
