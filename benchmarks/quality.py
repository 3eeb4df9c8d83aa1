"""Quality of FPSA on the demo model: the paper's Table 5 and error-vs-step figure in miniature.

    python benchmarks/quality.py --seeds 2 --plot benchmarks/quality_attention_error.png
    python benchmarks/quality.py --seeds 4 --noise_seed 2000 --no_trace \
        --qat fpsa_jax/assets/demo/fpsa-qat.safetensors runs/qat-step1000.safetensors ...

Held-out captions (fpsa_jax.demo.task.HELD_OUT: (colour, shape, direction) combinations never
trained on, at both speeds) x noise seeds --noise_seed ... --noise_seed + --seeds - 1, sampled
with the demo's settings under:

  dense bf16                  the dense-trained model, dense attention (the reference videos)
  FP8 only                    the dense-trained model, the demo schedule without its windows
  sparse only                 the dense-trained model, the demo schedule without FP8
  training-free FP8 + sparse  the dense-trained model, the demo schedule as is
  FPSA after QAT              the FPSA-fine-tuned model, the demo schedule it was trained with
  (QAT model, dense)          the fine-tuned model with dense attention, for context
  dense bf16 + FP8 linears    the dense-trained model, dense attention, block linears in FP8
  FPSA after QAT + FP8 linears  the FPSA-fine-tuned model and schedule, block linears in FP8

Several --qat checkpoints (e.g. one run's exports at several steps: accuracy against QAT steps,
or runs with other schedules) each add their "FPSA after QAT" row, labelled with the file's name
and training step; a checkpoint whose schedule differs from those before it also adds its
"training-free FP8 + sparse" row (the dense model under that schedule). The other rows use the
first --qat.

FP8 linears (WanConfig.linear_quant "fp8", fpsa_jax.model.fp8_linear; no QAT of the linears) run
by --linear_impl: "cublaslt" where the backend has FP8 tensor cores, else "emulated" (the same
E4M3 values, float32 sums); the row names the impl. --rows picks rows (dense bf16, the reference,
always runs); --no_trace skips the attention error trace (it never covers FP8-linear rows).

For each: per-attribute accuracy of the analytic evaluator (fpsa_jax.demo.evaluate) and PSNR /
SSIM of its videos against the dense bf16 videos of the same caption and noise. Then the per-step
attention error (relative L2 and cosine of each layer's self-attention output against dense
attention on the same inputs, mean over layers) along each schedule's own sampling run, plotted to
--plot. All runs in the model's compute dtype (bfloat16) on whatever JAX runs on (CPU here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fpsa_jax.attention import IMPLS, Impl  # noqa: E402
from fpsa_jax.demo import DEFAULT_CHECKPOINT, DENSE_CHECKPOINT, load_demo  # noqa: E402
from fpsa_jax.demo.attention_trace import ErrorLog, mean_over_layers, traced_model_fn  # noqa: E402
from fpsa_jax.demo.evaluate import attribute_accuracy, chance_accuracy, read_attributes  # noqa: E402
from fpsa_jax.demo.generate import (  # noqa: E402
    generate,
    params_as,
    with_attention,
    with_linear_quant,
)
from fpsa_jax.demo.similarity import psnr, ssim  # noqa: E402
from fpsa_jax.demo.task import held_out_attributes  # noqa: E402
from fpsa_jax.model.fp8_linear import (  # noqa: E402
    FP8_LINEAR_IMPLS,
    Fp8LinearImpl,
    check_backend,
    fp8_gemm_support,
)

FP8_ROWS = ("dense bf16 + FP8 linears", "FPSA after QAT + FP8 linears")


def label(checkpoint) -> str:
    """A fine-tuned checkpoint's name in row labels: its training run and step (train.export_demo's
    provenance)."""
    run, step = checkpoint.info.get("run", "?"), checkpoint.info.get("step", "?")
    return f"{run}, step {step}"


def variants(dense, qats):
    """(name, checkpoint, schedule) of every row; schedule None = dense attention.

    qats: the fine-tuned checkpoints; the first gives the unlabelled rows, every further one its
    own "FPSA after QAT" row (and a training-free row when its schedule is new)."""
    qat = qats[0]
    fpsa = qat.schedule
    rows = [
        ("dense bf16", dense, None),
        ("FP8 only", dense, with_attention(fpsa, window=None)),
        ("sparse only", dense, with_attention(fpsa, quant="none")),
        ("training-free FP8 + sparse", dense, fpsa),
        ("FPSA after QAT", qat, fpsa),
        ("(QAT model, dense)", qat, None),
        (FP8_ROWS[0], with_linear_quant(dense, "fp8"), None),
        (FP8_ROWS[1], with_linear_quant(qat, "fp8"), fpsa),
    ]
    schedules = [fpsa]
    for extra in qats[1:]:
        if extra.schedule not in schedules:
            schedules.append(extra.schedule)
            rows.append((f"training-free FP8 + sparse [{label(extra)}]", dense, extra.schedule))
        rows.append((f"FPSA after QAT [{label(extra)}]", extra, extra.schedule))
    return rows


def base_name(name: str) -> str:
    """A row's variant without its checkpoint label: what --rows selects by."""
    return name.split(" [", 1)[0]


def held_out_targets(seeds: int, noise_seed: int):
    """(attributes, noise seeds): every held-out caption at noise seeds noise_seed + 0..seeds-1."""
    targets = [a for a in held_out_attributes() for _ in range(seeds)]
    return targets, [noise_seed + i % seeds for i in range(len(targets))]


def evaluate(name, ckpt, schedule, targets, noise_seeds, impl, linear_impl, reference=None):
    """(row, videos): the attribute accuracy of `ckpt` sampled under `schedule` on `targets`, and
    PSNR / SSIM against `reference` (the dense videos; None = these videos are the reference)."""
    start = time.perf_counter()
    videos = generate(
        ckpt,
        [a.caption for a in targets],
        noise_seeds,
        schedule=schedule,
        attention_impl=impl,
        linear_impl=linear_impl,
    )
    if base_name(name) in FP8_ROWS:
        name = f"{name} ({linear_impl})"
    seconds = time.perf_counter() - start
    reference = videos if reference is None else reference
    acc = attribute_accuracy([read_attributes(v) for v in videos], targets)
    row = {
        "variant": name,
        **{f"acc_{k}": v for k, v in acc.items()},
        "psnr_db": float(np.mean([psnr(v, r) for v, r in zip(videos, reference, strict=True)])),
        "ssim": float(np.mean([ssim(v, r) for v, r in zip(videos, reference, strict=True)])),
        "seconds": seconds,
        "videos": len(videos),
    }
    return row, videos


def quality_table(
    dense,
    qats,
    seeds: int,
    impl: Impl,
    linear_impl: Fp8LinearImpl,
    rows_wanted=None,
    noise_seed: int = 1000,
) -> list[dict]:
    targets, noise_seeds = held_out_targets(seeds, noise_seed)
    rows, reference = [], None
    for name, ckpt, schedule in variants(dense, qats):
        if reference is not None and rows_wanted is not None and base_name(name) not in rows_wanted:
            continue
        row, videos = evaluate(
            name, ckpt, schedule, targets, noise_seeds, impl, linear_impl, reference
        )
        reference = videos if reference is None else reference
        rows.append(row)
        print(f"{row['variant']}: {row}", flush=True)
    return rows


def attention_errors(dense, qats, captions: int, impl: Impl) -> dict[str, dict]:
    """Mean-over-layers rel L2 and cosine per step, for each non-dense variant."""
    targets = held_out_attributes()[:captions]
    out = {}
    for name, ckpt, schedule in variants(dense, qats):
        if schedule is None or base_name(name) in FP8_ROWS:
            continue
        log = ErrorLog()
        fn = traced_model_fn(ckpt.config, params_as(ckpt), log, impl)
        generate(
            ckpt,
            [a.caption for a in targets],
            [1000] * len(targets),
            schedule=schedule,
            model_fn=fn,
        )
        errors = log.per_step(ckpt.sampling.num_steps, ckpt.config.num_layers)
        out[name] = {k: list(map(float, v)) for k, v in mean_over_layers(errors).items()}
        print(f"{name}: rel_l2 per step {np.round(out[name]['rel_l2'], 4).tolist()}", flush=True)
    return out


def plot(errors: dict[str, dict], schedule, num_steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = np.arange(num_steps)
    for name, e in errors.items():
        axes[0].plot(steps, e["rel_l2"], marker="o", ms=3, label=name)
        axes[1].plot(steps, e["cosine"], marker="o", ms=3, label=name)
    bounds = [
        i
        for i in range(1, num_steps)
        if schedule.phase_index(i, num_steps) != schedule.phase_index(i - 1, num_steps)
    ]
    for ax, title in zip(
        axes, ("relative L2 error vs dense", "cosine similarity vs dense"), strict=True
    ):
        for b in bounds:
            ax.axvline(b - 0.5, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("denoising step (0 = noisiest)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("Demo model: self-attention output error per step (mean over layers)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: list[dict]) -> str:
    chance = chance_accuracy()
    head = (
        "| variant | colour | shape | direction | speed | all four | PSNR dB vs dense "
        "| SSIM vs dense |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        p = "inf" if not np.isfinite(r["psnr_db"]) else f"{r['psnr_db']:.2f}"
        lines.append(
            f"| {r['variant']} | {r['acc_colour']:.3f} | {r['acc_shape']:.3f} | "
            f"{r['acc_direction']:.3f} | {r['acc_speed']:.3f} | {r['acc_all']:.3f} | {p} | "
            f"{r['ssim']:.4f} |"
        )
    lines.append(
        f"| (chance) | {chance['colour']:.3f} | {chance['shape']:.3f} | {chance['direction']:.3f} "
        f"| {chance['speed']:.3f} | {chance['all']:.3f} | | |"
    )
    return head + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dense", default=str(DENSE_CHECKPOINT), help="dense-trained checkpoint")
    parser.add_argument(
        "--qat",
        nargs="+",
        default=[str(DEFAULT_CHECKPOINT)],
        help="FPSA fine-tuned checkpoint(s); each after the first adds its own labelled rows",
    )
    parser.add_argument("--seeds", type=int, default=2, help="noise seeds per held-out caption")
    parser.add_argument(
        "--noise_seed", type=int, default=1000, help="the first noise seed (then +1, +2, ...)"
    )
    parser.add_argument("--trace_captions", type=int, default=4, help="captions in the error trace")
    parser.add_argument("--impl", default="xla", choices=IMPLS, help="attention implementation")
    parser.add_argument("--plot", default="benchmarks/quality_attention_error.png")
    parser.add_argument("--json", default=None, help="also write all numbers to this JSON file")
    parser.add_argument(
        "--linear_impl",
        default=None,
        choices=FP8_LINEAR_IMPLS,
        help="FP8 linears' impl (default: cublaslt with FP8 tensor cores, else emulated)",
    )
    parser.add_argument("--rows", nargs="+", default=None, help="only these rows (+ dense bf16)")
    parser.add_argument("--no_trace", action="store_true", help="skip the attention error trace")
    args = parser.parse_args()
    linear_impl = args.linear_impl or ("cublaslt" if fp8_gemm_support() is None else "emulated")
    try:
        check_backend(linear_impl)
    except ValueError as e:
        parser.error(str(e))

    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if not 0 <= args.noise_seed <= 2**32 - args.seeds:
        parser.error(f"--noise_seed must be in [0, 2^32 - --seeds], got {args.noise_seed}")
    for path in [args.dense, *args.qat]:
        if not Path(path).is_file():
            parser.error(f"no checkpoint file {path}")
    dense = load_demo(args.dense)
    qats = [load_demo(path) for path in args.qat]
    for path, qat in zip(args.qat, qats, strict=True):
        if qat.schedule is None:
            parser.error(f"--qat {path} was trained dense; it has no FPSA schedule")
    known = sorted({base_name(name) for name, _, _ in variants(dense, qats)})
    unknown = sorted(set(args.rows or ()) - set(known))
    if unknown:
        parser.error(f"--rows: unknown {unknown}; valid: {known}")
    rows = quality_table(
        dense, qats, args.seeds, args.impl, linear_impl, args.rows, args.noise_seed
    )
    errors = {} if args.no_trace else attention_errors(dense, qats, args.trace_captions, args.impl)
    if errors:
        plot(errors, qats[0].schedule, qats[0].sampling.num_steps, Path(args.plot))
    print()
    print(markdown(rows))
    if errors:
        print(f"\nattention error plot: {Path(args.plot).resolve()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "attention_errors": errors}, indent=1))


if __name__ == "__main__":
    main()
