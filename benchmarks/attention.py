"""FPSA attention benchmark: the Mosaic GPU and Triton kernels at several sparsities against cuDNN.

    python benchmarks/attention.py                 # 1.3B/480p and 14B/720p shapes (H100)
    python benchmarks/attention.py --xla           # also the portable `xla` path
    python benchmarks/attention.py --quick         # small shapes; runs on CPU (xla only)
    python benchmarks/attention.py --out rows.json # also write rows (.json or .md)
    python benchmarks/attention.py --impls triton  # only triton's rows (and cuDNN bf16)

bf16 random-normal inputs, B = 1, D = 128, tile (3, 8, 8). Forward rows: cuDNN bf16 and FP8
(dense), `mosaic` and `triton` FP8 with the full window and at ~50/75/90% sparsity, both bf16
(quant "none") with the full window, `pallas` bf16 at ~90%. Backward rows: the pullback of cuDNN
bf16 (dense) and of `mosaic` and `triton` FP8 at ~90% (the same bf16 block-sparse Triton
backward), timed alone on saved residuals. Each row is the median of --iters timed runs after
warm-up, each synchronised with block_until_ready; kernel times include the pre-pass (tile
reorder and FP8 quantization: scales in XLA, values by the Triton pre-pass kernel) and, for
`mosaic`, the reorder of its output back to token order.
Dense-equivalent TFLOP/s counts 4 * B * N * L^2 * D flops forward and 2.5x that backward, whatever
the sparsity; effective TFLOP/s multiplies it by the density; speedup is against cuDNN bf16 for the
same pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from timing import median_seconds  # benchmarks/timing.py (scripts run from their folder)

from fpsa_jax.attention import FPSAConfig, fpsa_attention


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    grid: tuple[int, int, int]
    heads: int
    head_dim: int = 128
    batch: int = 1

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)


FULL_SHAPES = (Shape("1.3B-480p", (21, 30, 52), 12), Shape("14B-720p", (21, 45, 80), 40))
QUICK_SHAPES = (Shape("quick", (4, 8, 8), 2, head_dim=64),)
TILE = (3, 8, 8)
QUICK_TILE = (2, 4, 4)
TARGET_SPARSITIES = (0.5, 0.75, 0.9)


def pick_window(grid, tile, sparsity):
    """The window (in tiles) whose density is closest to 1 - sparsity, preferring cube-like ones."""
    n = [math.ceil(g / t) for g, t in zip(grid, tile, strict=True)]
    best = None
    for wt in range(1, n[0] + 1):
        for wh in range(1, n[1] + 1):
            for ww in range(1, n[2] + 1):
                density = wt * wh * ww / math.prod(n)
                # Tie-break on the spread of per-axis coverage so windows stay roughly isotropic.
                cover = (wt / n[0], wh / n[1], ww / n[2])
                key = (abs(density - (1 - sparsity)), max(cover) - min(cover))
                if best is None or key < best[0]:
                    best = (key, (wt, wh, ww))
    return best[1]


def cases(shape, tile, with_xla: bool, on_gpu: bool):
    """(pass, impl, config, label) rows for one shape."""
    window_90 = pick_window(shape.grid, tile, 0.9)
    if on_gpu:
        yield "fwd", "cudnn", None, "dense"
        yield "fwd", "cudnn_fp8", None, "dense"
        for impl in ("mosaic", "triton"):
            yield "fwd", impl, FPSAConfig(tile=tile, quant="fp8"), "full window fp8"
            for s in TARGET_SPARSITIES:
                window = pick_window(shape.grid, tile, s)
                config = FPSAConfig(tile=tile, window=window, quant="fp8")
                yield "fwd", impl, config, f"{window} fp8"
            yield "fwd", impl, FPSAConfig(tile=tile), "full window bf16"
        yield "fwd", "pallas", FPSAConfig(tile=tile, window=window_90), f"{window_90} bf16"
        yield "bwd", "cudnn", None, "dense"
        for impl in ("mosaic", "triton"):
            config = FPSAConfig(tile=tile, window=window_90, quant="fp8")
            yield "bwd", impl, config, f"{window_90} fp8"
    if with_xla or not on_gpu:
        for s in TARGET_SPARSITIES:
            window = pick_window(shape.grid, tile, s)
            yield "fwd", "xla", FPSAConfig(tile=tile, window=window, quant="fp8"), f"{window} fp8"


def timed_call(kind, impl, config, grid, q, k, v):
    """(jitted fn, its args): the forward, or the pullback alone on saved residuals."""
    attend = lambda q, k, v: fpsa_attention(q, k, v, grid=grid, config=config, impl=impl)
    if kind == "fwd":
        return jax.jit(attend), (q, k, v)
    out, pullback = jax.vjp(attend, q, k, v)  # a pytree (Partial) holding the residuals
    do = jax.random.normal(jax.random.key(1), out.shape, out.dtype)
    return jax.jit(lambda pullback, do: pullback(do)), (pullback, do)


def run(args) -> list[dict]:
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    tile = QUICK_TILE if args.quick else TILE
    on_gpu = jax.default_backend() == "gpu"
    rows = []
    for shape in shapes:
        b, n, d, length = shape.batch, shape.heads, shape.head_dim, shape.tokens
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(kk, (b, length, n, d), jnp.bfloat16) for kk in keys)
        fwd_flops = 4 * b * n * length * length * d
        base = {}
        for kind, impl, config, label in cases(shape, tile, args.xla, on_gpu):
            if args.impls and impl not in args.impls and impl != "cudnn":
                continue  # cuDNN bf16 always runs: every speedup is against it
            try:
                fn, fn_args = timed_call(kind, impl, config, shape.grid, q, k, v)
                t = median_seconds(fn, fn_args, args.warmup, args.iters)
            except Exception as e:  # noqa: BLE001 - report and go on with the other rows
                print(f"FAILED {kind} {impl} {shape.name} {label}: {type(e).__name__}: {e}")
                continue
            if impl == "cudnn":
                base[kind] = t
            flops = fwd_flops * (1.0 if kind == "fwd" else 2.5)
            density = 1.0 if config is None else config.density(shape.grid)
            rows.append(
                dict(
                    pass_=kind,
                    impl=impl,
                    shape=f"{shape.name} B{b} L{length} N{n} D{d}",
                    window=label,
                    density=round(density, 4),
                    ms=round(t * 1e3, 3),
                    dense_tflops=round(flops / t / 1e12, 1),
                    effective_tflops=round(flops * density / t / 1e12, 1),
                    speedup=round(base[kind] / t, 2) if kind in base else "",
                )
            )
            print(format_row(rows[-1]), flush=True)
    return rows


COLUMNS = (
    "pass_",
    "impl",
    "shape",
    "window",
    "density",
    "ms",
    "dense_tflops",
    "effective_tflops",
    "speedup",
)


def format_row(row) -> str:
    return " | ".join(str(row[c]) for c in COLUMNS)


def markdown(rows, meta) -> str:
    lines = [f"<!-- {json.dumps(meta)} -->", "| " + " | ".join(COLUMNS) + " |"]
    lines.append("|" + "---|" * len(COLUMNS))
    lines += ["| " + format_row(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes (CPU smoke test)")
    p.add_argument("--iters", type=int, default=10, help="timed runs (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (compiles)")
    p.add_argument("--xla", action="store_true", help="also time the portable xla path")
    p.add_argument("--out", type=Path, help="write rows to this .json or .md file")
    p.add_argument(
        "--impls",
        nargs="+",
        choices=("cudnn_fp8", "mosaic", "triton", "pallas", "xla"),
        help="only these impls' rows (and cuDNN bf16, the baseline)",
    )
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 1:
        p.error("--iters and --warmup must be >= 1")
    meta = dict(
        device=str(jax.devices()[0].device_kind),
        backend=jax.default_backend(),
        jax=jax.__version__,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command=" ".join(["python"] + sys.argv),
    )
    print(json.dumps(meta))
    print(" | ".join(COLUMNS))
    rows = run(args)
    if args.out:
        if args.out.suffix == ".md":
            args.out.write_text(markdown(rows, meta))
        else:
            args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
        print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
