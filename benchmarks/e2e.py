"""End-to-end timing of Wan2.1 text-to-video on one GPU: the DiT denoising loop and VAE decode.

The denoising loop is the real one (`fpsa_jax.pipeline.denoise`: UniPC, CFG as a batch of 2,
jitted per phase) with random bf16 weights, random text embeddings and noise. Modes:
  dense  cuDNN bf16 attention every step (`impl="auto"` on a GPU)
  fpsa   the StepSchedule preset of the resolution through --fpsa_impl (the best available kernel)
Per-step times come from host timestamps of the loop's progress reports; per-phase figures are
their medians over the phase's steps. VAE decode uses the full Wan2.1 VAE (random weights).
--linear_quant none fp8 runs every mode with bf16 and with FP8 block linears (weights quantized at
load, `fpsa_jax.model.fp8_linear`; needs FP8 tensor cores), e.g. dense bf16 vs FPSA vs FPSA + FP8.

    python benchmarks/e2e.py                          # 1.3B, 832*480, 81 frames, 50 steps
    python benchmarks/e2e.py --preset tiny --size 64*64 --frame_num 9 --steps 4   # CPU smoke
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax import pipeline
from fpsa_jax.attention import IMPLS, StepSchedule
from fpsa_jax.config import LINEAR_QUANTS, WanConfig
from fpsa_jax.convert import T2VWeights, with_fp8_linears
from fpsa_jax.model import vae as wan_vae
from fpsa_jax.model import wan
from fpsa_jax.model.fp8_linear import check_backend
from fpsa_jax.model.random_weights import random_weights
from fpsa_jax.sampling import step_segments


def _peak_gib() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", float("nan")) / 2**30


def time_denoise(weights, noise, context, negative, args, schedule, impl) -> dict:
    """One full sampling run; returns wall time and per-step completion times."""
    stamps: list[float] = []
    start = time.perf_counter()
    latents = pipeline.denoise(
        weights,
        noise,
        context,
        negative,
        num_steps=args.steps,
        shift=args.shift,
        guide_scale=5.0,
        solver="unipc",
        schedule=schedule,
        attention_impl=impl,
        progress=lambda done, total: stamps.append(time.perf_counter()),
    )
    total = time.perf_counter() - start
    assert bool(jnp.isfinite(latents).all()), "non-finite latents"
    steps = np.diff([start, *sorted(stamps)])
    return {"total_s": total, "step_s": steps, "latents": latents}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="t2v-1.3b")
    parser.add_argument("--size", default="832*480", help="WIDTH*HEIGHT")
    parser.add_argument("--frame_num", type=int, default=81)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--shift", type=float, default=5.0)
    parser.add_argument(
        "--modes",
        nargs="*",
        default=["dense", "fpsa"],
        choices=["dense", "fpsa"],
        help="loops to time; none = VAE decode only (of random latents)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="dense runs (the first compiles)")
    parser.add_argument("--fpsa_repeats", type=int, default=1, help="fpsa runs")
    parser.add_argument(
        "--fpsa_impl", default="xla", choices=IMPLS, help="impl for the FPSA phases"
    )
    parser.add_argument("--schedule", default=None, help="StepSchedule preset (default by size)")
    parser.add_argument("--vae", default="wan2.1", help="VAE preset for the decode timing")
    parser.add_argument(
        "--linear_quant",
        nargs="+",
        default=["none"],
        choices=LINEAR_QUANTS,
        help="block linears of each mode's runs: none (bf16), fp8 (one row each)",
    )
    args = parser.parse_args()
    if "fp8" in args.linear_quant:
        try:
            check_backend("cublaslt")
        except ValueError as e:
            parser.error(f"--linear_quant fp8: {e}")

    width, height = (int(s) for s in args.size.split("*"))
    shape = pipeline.latent_shape(1, width, height, args.frame_num)
    config = WanConfig.preset(args.preset, param_dtype="bfloat16")
    vae_config = wan_vae.WanVAEConfig.preset(args.vae)
    key = jax.random.key(0)
    weights = T2VWeights(
        config,
        random_weights(functools.partial(wan.init_params, config), key),
        vae_config,
        random_weights(functools.partial(wan_vae.init_params, vae_config), key, std=0.05),
    )
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    noise = jax.random.normal(k1, shape, jnp.float32)
    context = jax.random.normal(k2, (1, config.text_len, config.text_dim), jnp.bfloat16)
    negative = jax.random.normal(k3, (1, config.text_len, config.text_dim), jnp.bfloat16)
    name = args.schedule or ("wan-480p" if width * height <= 832 * 480 else "wan-720p")
    fpsa = StepSchedule.preset(name)
    grid = (shape[1], shape[2] // 2, shape[3] // 2)
    print(
        f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; {args.preset} "
        f"{args.size} x {args.frame_num} frames, token grid {grid}, {args.steps} UniPC steps, CFG"
    )

    by_quant = {"none": weights}
    if "fp8" in args.linear_quant:
        by_quant["fp8"] = with_fp8_linears(weights)
    rows = []
    for mode, quant in ((m, q) for m in args.modes for q in args.linear_quant):
        schedule, impl = (None, "auto") if mode == "dense" else (fpsa, args.fpsa_impl)
        repeats = args.repeats if mode == "dense" else args.fpsa_repeats
        runs = [
            time_denoise(by_quant[quant], noise, context, negative, args, schedule, impl)
            for _ in range(repeats)
        ]
        last = runs[-1]
        segments = step_segments(schedule, args.steps)
        phases = []
        from_medians = 0.0  # the loop's seconds with every step at its phase's median
        for seg in segments:
            seg_steps = last["step_s"][seg.start : seg.stop]
            density = 1.0 if seg.attention is None else seg.attention.density(grid)
            median = statistics.median(seg_steps)
            from_medians += median * (seg.stop - seg.start)
            phases.append(
                f"steps {seg.start}-{seg.stop - 1} density {density:.2f}: "
                f"{1e3 * median:.0f} ms/step"
            )
        label = mode if quant == "none" else f"{mode} + FP8 linears"
        rows.append(
            dict(
                label=label,
                impl=impl,
                first_s=runs[0]["total_s"],
                last_s=last["total_s"],
                phases=phases,
                from_medians_s=from_medians,
            )
        )
        print(
            f"{label}: runs {[round(r['total_s'], 1) for r in runs]} s; " + "; ".join(phases),
            flush=True,
        )

    latents = last["latents"] if rows else noise
    decode = jax.jit(functools.partial(wan_vae.decode, vae_config))
    vae_times = []
    for _ in range(2):
        start = time.perf_counter()
        video = jax.block_until_ready(decode(weights.vae_params, latents))
        vae_times.append(time.perf_counter() - start)
    assert bool(jnp.isfinite(video).all())

    print(
        f"\n| mode | attention impl | {args.steps}-step loop, first run s (compile incl.) | "
        f"last run s | loop at the per-step medians s | per phase |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['label']} | {r['impl']} | {r['first_s']:.1f} | {r['last_s']:.1f} | "
            f"{r['from_medians_s']:.1f} | {'; '.join(r['phases'])} |"
        )
    # With one run per mode a run's total includes its compilation; the per-step medians do not.
    base = rows[0] if rows else None
    for r in rows[1:]:
        print(
            f"speed-up of {r['label']} over {base['label']}: "
            f"{base['from_medians_s'] / r['from_medians_s']:.2f}x from the per-step medians, "
            f"{base['last_s'] / r['last_s']:.2f}x from the last runs' totals"
        )
    print(
        f"VAE decode {tuple(latents.shape)} -> {tuple(video.shape)}: first {vae_times[0]:.1f} s"
        f" (compile incl.), then {vae_times[1]:.1f} s; peak device memory {_peak_gib():.1f} GiB"
    )


if __name__ == "__main__":
    main()
