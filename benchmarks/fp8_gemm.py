"""Which JAX form of an E4M3 x E4M3 matmul with float32 accumulation runs on FP8 tensor cores, at
the Wan2.1 DiT's block matmul shapes (DESIGN.md section 7; issue 18).

Every form computes y [M, N] float32 = x [M, K] @ w [K, N] from bf16 x and bf16 w, the weights
quantized once outside the timing (per output channel unless the form cannot), the activations
quantized inside it where the row says "linear" (what the model pays per call); "GEMM" rows take
pre-quantized activations. Forms:

  bf16                      lax.dot_general on bf16, float32 out: the baseline (ratio 1)
  (a) f8 dot_general        lax.dot_general on float8_e4m3fn operands, preferred float32; also
                            with DotAlgorithmPreset ANY_F8_ANY_F8_F32 (and _FAST_ACCUM)
  (b) dequant-then-dot      convert(f8 -> bf16) [* scalar scale] then dot: the pattern XLA's GEMM
                            rewriter turns into cuBLASLt's FP8 GEMM. "model" is
                            fpsa_jax.model.fp8_linear's form (per-token and per-channel scales on
                            the GEMM's bf16 output); variants: per-tensor activation scale inside
                            the GEMM, float32 GEMM output (the model's form before 2026-12-01),
                            weight stored [N, K]
  (c) flax fp8_ops          flax.linen.fp8_ops.fp8_scaled_dot_general: per-tensor scales from an
                            amax history (length 1, the current amax), both operands quantized at
                            every call (flax has no pre-quantized-weight path)
  (d) jax.nn                scaled_matmul with per-row float32 scales (block = K), and
                            scaled_dot_general with the mxfp8 config (blocks of 32, E8M0 scales)

Every form compiles with the options the model's FP8 programs use
(`fp8_linear.CUBLASLT_COMPILER_OPTIONS`: no Triton GEMM fusions, so dots go to cuBLAS / cuBLASLt);
--xla_defaults compiles with XLA's defaults instead (benchmarks/fp8_compile_flags.sh compares).

Columns: TFLOP/s (2 M K N / median time), ratio to bf16 in the same run, whether the compiled HLO
holds cuBLASLt's FP8 custom call (`__cublas$lt$matmul$f8`) and which GEMM call it holds, the
GEMM's own error (max |y - ref| / max |ref| against a float32 HIGHEST matmul of the form's own
dequantized operands, on the first 2048 rows) and the quantization error (relative L2 against the
float32 matmul of the unquantized bf16 operands). Data: x = normal * exp(0.5 normal) per row
(tokens of different magnitudes, as activations have), w = normal * exp(0.25 normal) per column.

    python benchmarks/fp8_gemm.py                            # every shape (an H100/H200)
    python benchmarks/fp8_gemm.py --shapes 14b-qkvo 1.3b-ffn-in --forms bf16 "(b) model, linear"
    python benchmarks/fp8_gemm.py --smoke                    # tiny shapes, any backend
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import re
import time
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
from timing import median_seconds  # benchmarks/timing.py (scripts run from their folder)

from fpsa_jax.attention.quant import FP8, QuantizedTensor, to_e4m3
from fpsa_jax.model.fp8_linear import (
    CUBLASLT_COMPILER_OPTIONS,
    GEMM_OUTPUT_DTYPES,
    quantize_tokens,
    quantize_weight,
    scaled_fp8_dot,
)

F32, BF16 = jnp.float32, jnp.bfloat16
E4M3_MAX = 448.0
F8_CALL = "__cublas$lt$matmul$f8"
ERROR_ROWS = 2048
# name: (M, K, N). Tokens B=2 x L (the CFG pair): 14B/720p L=75,600, 1.3B/480p L=32,760; text k/v
# project B=2 x 512 text rows.
SHAPES = {
    "14b-qkvo": (2 * 75_600, 5120, 5120),
    "14b-ffn-in": (2 * 75_600, 5120, 13824),
    "14b-ffn-out": (2 * 75_600, 13824, 5120),
    "14b-text-kv": (2 * 512, 5120, 5120),
    "1.3b-qkvo": (2 * 32_760, 1536, 1536),
    "1.3b-ffn-in": (2 * 32_760, 1536, 8960),
    "1.3b-ffn-out": (2 * 32_760, 8960, 1536),
    "1.3b-text-kv": (2 * 512, 1536, 1536),
}
# Odd M and N; K a multiple of 32 (mxfp8 blocks).
SMOKE_SHAPES = {"smoke-a": (97, 64, 80), "smoke-b": (40, 96, 51)}


@dataclasses.dataclass(frozen=True)
class Prepared:
    """fn(*args) -> y float32 [M, N]; deq = (x, w) dequantized float32 (None: not replicable)."""

    fn: Callable
    args: tuple
    deq: tuple[jax.Array, jax.Array] | None


def _dims(x):
    return (((x.ndim - 1,), (0,)), ((), ()))


def _per_tensor(x):
    amax = jnp.abs(x.astype(F32)).max()
    return jnp.where(amax > 0, amax / E4M3_MAX, 1.0)


def _deq(q: QuantizedTensor):
    return q.values.astype(F32) * q.scales


# -- the forms: (x bf16 [M, K], w bf16 [K, N]) -> Prepared ------------------------------------


def bf16(x, w):
    fn = lambda x, w: jax.lax.dot_general(x, w, _dims(x), preferred_element_type=F32)  # noqa: E731
    return Prepared(fn, (x, w), (x.astype(F32), w.astype(F32)))


def bf16_out(x, w):
    fn = lambda x, w: jax.lax.dot_general(x, w, _dims(x), preferred_element_type=BF16)  # noqa: E731
    return Prepared(fn, (x, w), (x.astype(F32), w.astype(F32)))


def f8_linear_bf16_out(precision, x, w):
    """Activations quantized in the call, f8 x f8 dot with a bf16 result, both scales after."""
    qw = quantize_weight(w)

    def fn(x, qw):
        qx = quantize_tokens(x, "cublaslt")
        y = jax.lax.dot_general(
            qx.values, qw.values, _dims(x), precision, preferred_element_type=BF16
        )
        return y.astype(F32) * qx.scales * qw.scales

    return Prepared(fn, (x, qw), (_deq(quantize_tokens(x, "cublaslt")), _deq(qw)))


def f8_dot(precision, x, w):
    qx, qw = quantize_tokens(x, "cublaslt"), quantize_weight(w)

    def fn(xv, sx, wv, sw):
        y = jax.lax.dot_general(xv, wv, _dims(xv), precision, preferred_element_type=F32)
        return y * sx * sw

    return Prepared(fn, (qx.values, qx.scales, qw.values, qw.scales), (_deq(qx), _deq(qw)))


def model_gemm(x, w, gemm_dtype=GEMM_OUTPUT_DTYPES["cublaslt"]):
    qx, qw = quantize_tokens(x, "cublaslt"), quantize_weight(w)
    fn = lambda qx, qw: scaled_fp8_dot(qx, qw, gemm_dtype)  # noqa: E731
    return Prepared(fn, (qx, qw), (_deq(qx), _deq(qw)))


def model_linear(x, w, gemm_dtype=GEMM_OUTPUT_DTYPES["cublaslt"]):
    qw = quantize_weight(w)
    fn = lambda x, qw: scaled_fp8_dot(quantize_tokens(x, "cublaslt"), qw, gemm_dtype)  # noqa: E731
    return Prepared(fn, (x, qw), (_deq(quantize_tokens(x, "cublaslt")), _deq(qw)))


def per_tensor_in_gemm(x, w):
    """The scalar activation scale inside the pattern (cuBLASLt's a_scale), per-channel w after."""
    qw = quantize_weight(w)

    def fn(x, qw):
        sx = _per_tensor(x)
        xq = to_e4m3(x.astype(F32) / sx)
        y = jax.lax.dot_general(
            xq.astype(BF16) * sx.astype(BF16),
            qw.values.astype(BF16),
            _dims(x),
            preferred_element_type=F32,
        )
        return y * qw.scales

    sx = _per_tensor(x).astype(BF16).astype(F32)
    xd = to_e4m3(x.astype(F32) / _per_tensor(x)).astype(F32) * sx
    return Prepared(fn, (x, qw), (xd, _deq(qw)))


def weight_nk(x, w):
    qw = quantize_weight(w)
    wt, sw = qw.values.T, qw.scales  # stored [N, K], contracted on its minor dim

    def fn(x, wt, sw):
        qx = quantize_tokens(x, "cublaslt")
        y = jax.lax.dot_general(
            qx.values.astype(BF16),
            wt.astype(BF16),
            (((1,), (1,)), ((), ())),
            preferred_element_type=F32,
        )
        return y * qx.scales * sw

    return Prepared(fn, (x, wt, sw), (_deq(quantize_tokens(x, "cublaslt")), _deq(qw)))


def flax_fp8(x, w):
    from flax.linen import fp8_ops

    def fn(x, w):
        history = lambda a: jnp.abs(a.astype(F32)).max().reshape(1)  # noqa: E731
        return fp8_ops.fp8_scaled_dot_general(
            x,
            w,
            _dims(x),
            preferred_element_type=F32,
            lhs_scale=jnp.ones((1,), F32),
            rhs_scale=jnp.ones((1,), F32),
            grad_scale=jnp.ones((1,), F32),
            lhs_amax_history=history(x),
            rhs_amax_history=history(w),
            grad_amax_history=jnp.zeros((1,), F32),
            quantize_compute_type=F32,
        )

    def deq(a):  # flax's quantize: a / s clipped to +-448, cast; s = amax / 448 (per tensor)
        s = _per_tensor(a)
        q = jnp.clip(a.astype(F32) / s, -E4M3_MAX, E4M3_MAX).astype(FP8)
        return q.astype(F32) * s

    return Prepared(fn, (x, w), (deq(x), deq(w)))


def scaled_matmul_rows(x, w):
    qx, qw = quantize_tokens(x, "cublaslt"), quantize_weight(w)

    def fn(xv, sx, wt, swt):
        y = jax.nn.scaled_matmul(xv[None], wt[None], sx[None], swt[None])
        return y[0]

    args = (qx.values, qx.scales, qw.values.T, qw.scales.T)  # [M, K], [M, 1], [N, K], [N, 1]
    return Prepared(fn, args, (_deq(qx), _deq(qw)))


def mxfp8(x, w):
    configs = [jax.nn.get_scaled_dot_general_config("mxfp8")] * 3
    fn = functools.partial(jax.nn.scaled_dot_general, configs=configs)
    fn = lambda x, w, fn=fn: fn(x, w, _dims(x), preferred_element_type=F32)  # noqa: E731
    return Prepared(fn, (x, w), None)


FORMS: dict[str, Callable[[jax.Array, jax.Array], Prepared]] = {
    "bf16": bf16,
    "bf16, bf16 out": bf16_out,
    "(a) f8 dot_general, GEMM": functools.partial(f8_dot, None),
    "(a) f8 ANY_F8_ANY_F8_F32, GEMM": functools.partial(
        f8_dot, jax.lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32
    ),
    "(a) f8 ..._F32_FAST_ACCUM, GEMM": functools.partial(
        f8_dot, jax.lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32_FAST_ACCUM
    ),
    "(a) f8 bf16 out, linear": functools.partial(f8_linear_bf16_out, None),
    "(a) f8 FAST_ACCUM bf16 out, linear": functools.partial(
        f8_linear_bf16_out, jax.lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32_FAST_ACCUM
    ),
    "(b) model, GEMM": model_gemm,
    "(b) model, linear": model_linear,
    "(b) per-tensor x in GEMM, linear": per_tensor_in_gemm,
    "(b) float32 GEMM output, linear": functools.partial(model_linear, gemm_dtype=F32),
    "(b) weight [N, K], linear": weight_nk,
    "(c) flax fp8_scaled_dot_general": flax_fp8,
    "(d) nn.scaled_matmul rows, GEMM": scaled_matmul_rows,
    "(d) nn.scaled_dot_general mxfp8": mxfp8,
}


def gemm_calls(hlo: str) -> str:
    """The GEMM custom calls of a compiled HLO text, e.g. '__cublas$lt$matmul$f8'."""
    calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))
    gemms = [c for c in calls if re.search(r"cublas|gemm|matmul|cudnn|triton", c, re.I)]
    if gemms:
        return ", ".join(gemms)
    return "fusion (triton gemm)" if "__triton_gemm" in hlo else "no custom call"


def _errors(y, prepared: Prepared, x, w) -> tuple[float | None, float]:
    r = min(ERROR_ROWS, x.shape[0])
    hi = jax.lax.Precision.HIGHEST
    y = y[:r].astype(F32)
    exact = jnp.dot(x[:r].astype(F32), w.astype(F32), precision=hi)
    quant = float(jnp.linalg.norm(y - exact) / jnp.linalg.norm(exact))
    if prepared.deq is None:
        return None, quant
    xd, wd = prepared.deq
    ref = jnp.dot(xd[:r], wd, precision=hi)
    return float(jnp.abs(y - ref).max() / jnp.abs(ref).max()), quant


def gemm_lines(hlo: str) -> list[str]:
    """The lines of a compiled HLO text that hold a dot, a GEMM custom call or a GEMM fusion
    (what the dot became), cut to 240 characters."""
    pattern = re.compile(r"\bdot\(|custom_call_target=|__triton_gemm|kind=kCustom")
    return [line.strip()[:240] for line in hlo.splitlines() if pattern.search(line)]


def run_form(
    name: str, x, w, warmup: int, iters: int, show_hlo: bool = False, options=None
) -> dict:
    m, k = x.shape
    n = w.shape[1]
    row = {"form": name}
    try:
        prepared = FORMS[name](x, w)
        fn = jax.jit(prepared.fn, compiler_options=options)
        compiled = fn.lower(*prepared.args).compile()
        row["calls"] = gemm_calls(compiled.as_text())
        row["f8_gemm"] = F8_CALL in compiled.as_text()
        if show_hlo:
            print(f"-- {name}: what the dot became", *gemm_lines(compiled.as_text()), sep="\n")
        seconds = median_seconds(compiled, prepared.args, warmup, iters)
        row["ms"] = 1e3 * seconds
        row["tflops"] = 2 * m * k * n / seconds / 1e12
        row["gemm_err"], row["quant_rel_l2"] = _errors(compiled(*prepared.args), prepared, x, w)
    except Exception as e:  # a form this backend cannot compile or run is a result too
        first = (str(e).strip().splitlines() or [""])[0][:120]
        row["error"] = f"{type(e).__name__}: {first}"
    return row


def run_shape(
    name: str, shape, forms, warmup: int, iters: int, show_hlo=False, options=None
) -> list[dict]:
    m, k, n = shape
    kx, kw, ks, kc = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (m, k), F32) * jnp.exp(0.5 * jax.random.normal(ks, (m, 1)))
    w = jax.random.normal(kw, (k, n), F32) * jnp.exp(0.25 * jax.random.normal(kc, (1, n)))
    x, w = x.astype(BF16), w.astype(BF16)
    rows = []
    for form in forms:
        row = {"shape": name, "M": m, "K": k, "N": n}
        row.update(run_form(form, x, w, warmup, iters, show_hlo, options))
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r["tflops"] for r in rows if r["form"] == "bf16" and "tflops" in r), None)
    for r in rows:
        r["ratio"] = r["tflops"] / base if base and "tflops" in r else None
    return rows


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def tables(rows: list[dict], shapes: list[str], forms: list[str]) -> str:
    by = {(r["shape"], r["form"]): r for r in rows}
    out = ["TFLOP/s (ratio to bf16, same run); E = failed (see the JSON lines above)", ""]
    out.append("| form | " + " | ".join(shapes) + " |")
    out.append("|---" * (len(shapes) + 1) + "|")
    for form in forms:
        cells = []
        for s in shapes:
            r = by[(s, form)]
            cells.append("E" if "error" in r else f"{r['tflops']:.4g} ({_fmt(r['ratio'], '.2f')}x)")
        out.append(f"| {form} | " + " | ".join(cells) + " |")
    first = shapes[0]
    out += ["", f"At {first}: GEMM calls in the compiled HLO and errors", ""]
    out.append("| form | cuBLASLt FP8 call | GEMM calls | GEMM err (max rel) | quant rel L2 |")
    out.append("|---|---|---|---|---|")
    for form in forms:
        r = by[(first, form)]
        if "error" in r:
            out.append(f"| {form} | - | {r['error']} | - | - |")
            continue
        out.append(
            f"| {form} | {'yes' if r['f8_gemm'] else 'no'} | {r['calls']} | "
            f"{_fmt(r['gemm_err'], '.1e')} | {r['quant_rel_l2']:.4f} |"
        )
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES))
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU test)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10, help="timed runs (median)")
    parser.add_argument(
        "--show_hlo", action="store_true", help="print the compiled HLO lines of each GEMM"
    )
    parser.add_argument("--json", default=None, help="also write every row to this file")
    parser.add_argument(
        "--xla_defaults",
        action="store_true",
        help="compile with XLA's default GEMM choice (Triton GEMM fusions autotuned) instead of "
        "the model's CUBLASLT_COMPILER_OPTIONS; XLA_FLAGS then decide",
    )
    parser.add_argument(
        "--max_seconds", type=float, default=None, help="start no new shape after this long"
    )
    args = parser.parse_args()
    options = None if args.xla_defaults else CUBLASLT_COMPILER_OPTIONS
    table = SMOKE_SHAPES if args.smoke else SHAPES
    shapes = list(table) if args.smoke or not args.shapes else args.shapes
    device = jax.devices()[0]
    libraries = {m: importlib.util.find_spec(m) is not None for m in ("qwix", "aqt", "tokamax")}
    print(
        f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, flax "
        f"{flax.__version__}; other FP8 libraries importable: {libraries}",
        flush=True,
    )
    start = time.perf_counter()
    rows, done = [], []
    for name in shapes:
        if args.max_seconds is not None and time.perf_counter() - start > args.max_seconds:
            print(f"--max_seconds {args.max_seconds:g} reached: skipping {name} and after")
            break
        rows += run_shape(
            name, table[name], args.forms, args.warmup, args.iters, args.show_hlo, options
        )
        done.append(name)
    shapes = done
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"\n{tables(rows, shapes, args.forms)}\n\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
