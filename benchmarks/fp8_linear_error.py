"""Error of FP8 block linears against bf16 linears in the Wan2.1 DiT, per layer and at the output.

Random bf16 weights (the head randomised too), random latents, timesteps and text, dense attention,
at a Wan shape (the cases of dit_forward.py). Two forwards on the same inputs:
  bf16  linear_quant "none" (the reference)
  fp8   linear_quant "fp8": block linears quantized (per output channel) and run by --linear_impl
and, reported as relative L2 errors (||fp8 - bf16|| / ||bf16||):
  stream   the residual stream after each block, FP8 model against bf16 model (the error so far,
           estimated on every s-th token, s = L // 4096)
  q ... o  each FP8 linear's output against the bf16 linear on the very same input (its own error,
           along the FP8 model's trajectory), self- and cross-attention; fc1, fc2 the FFN's.
           Where the input arrives already quantized (the LayerNorm-fed q, k, v, cross q, fc1, and
           fc2 from fc1's GELU epilogue: `fp8_linear.quantize_normed_tokens`) the bf16 linear
           sees the dequantized input, so those columns hold the weight and GEMM error only; the
           activations' rounding shows in the stream and the output
  output   the DiT's output (velocity), FP8 model against bf16 model

    python benchmarks/fp8_linear_error.py --cases 1.3b-480p 14b-720p --num_layers 8   # a GPU
    python benchmarks/fp8_linear_error.py --cases tiny-cpu --linear_impl emulated     # anywhere
"""

from __future__ import annotations

import argparse
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from dit_forward import CASES  # benchmarks/dit_forward.py (scripts run from their folder)

from fpsa_jax.attention import IMPLS, Impl
from fpsa_jax.attention.quant import QuantizedTensor
from fpsa_jax.config import WanConfig
from fpsa_jax.model.fp8_linear import FP8_LINEAR_IMPLS, Fp8Dense, Fp8LinearImpl, check_backend
from fpsa_jax.model.pending_linear import PendingLinear
from fpsa_jax.model.random_weights import random_weights
from fpsa_jax.model.wan import WanBlock, WanModel, init_params

STREAM_TOKENS = 4096
COLUMNS = (
    *(f"self.{p}" for p in "qkvo"),
    *(f"cross.{p}" for p in "qkvo"),
    "ffn.fc1",
    "ffn.fc2",
)
_MODULES = {"self_attn": "self", "cross_attn": "cross", "ffn": "ffn"}


def _sums(y, ref):
    y, ref = y.astype(jnp.float32), ref.astype(jnp.float32)
    return jnp.stack([jnp.sum(jnp.square(y - ref)), jnp.sum(jnp.square(ref))])


def _interceptor(stride: int, linears: bool):
    """Sows every block's residual stream (every `stride`-th token) and, with `linears`, each FP8
    linear's error sums against the bf16 linear on the same input."""

    def intercept(next_fun, args, kwargs, context):
        module, out = context.module, next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return out
        if isinstance(module, WanBlock):
            module.sow("intermediates", "stream", out[0][:, ::stride].astype(jnp.float32))
        elif linears and isinstance(module, Fp8Dense):
            p = module.variables["params"]
            f32 = jnp.dtype(module.dtype) == jnp.float32
            bf16 = nn.Dense(
                module.features,
                dtype=module.dtype,
                param_dtype=module.param_dtype,
                precision=jax.lax.Precision.HIGHEST if f32 else None,
            )
            x = args[0]
            x = x.dequantize(module.dtype) if isinstance(x, QuantizedTensor) else x
            ref = bf16.apply({"params": {"kernel": p["kernel"], "bias": p["bias"]}}, x)
            y = out.value() if isinstance(out, PendingLinear) else out  # q, k before their norm
            if isinstance(out, QuantizedTensor):  # fc1 with its GELU epilogue
                y, ref = out.dequantize(), jax.nn.gelu(ref.astype(jnp.float32), approximate=True)
            module.sow("intermediates", "error_sums", _sums(y, ref))
        return out

    return intercept


def run_case(
    name: str, num_layers: int | None, batch: int, linear_impl: Fp8LinearImpl, impl: Impl
) -> dict:
    preset, f, h, w = CASES[name]
    overrides = {} if num_layers is None else {"num_layers": num_layers}
    config = WanConfig.preset(preset, dtype="bfloat16", param_dtype="bfloat16", **overrides)
    params = random_weights(functools.partial(init_params, config), jax.random.key(0))
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    latents = jax.random.normal(k1, (batch, f, h, w, config.in_dim), jnp.float32)
    timesteps = jax.random.uniform(k2, (batch,), jnp.float32, 0, 1000)
    context = jax.random.normal(k3, (batch, config.text_len, config.text_dim), jnp.bfloat16)
    tokens = f * (h // 2) * (w // 2)
    stride = max(1, tokens // STREAM_TOKENS)

    def forward(cfg, linears, p, x, t, c):
        model = WanModel(cfg, attention_impl=impl, linear_impl=linear_impl)
        with nn.intercept_methods(_interceptor(stride, linears)):
            out, state = model.apply({"params": p}, x, t, c, mutable=["intermediates"])
        return out, state["intermediates"]["blocks"]

    start = time.perf_counter()
    ref, ref_state = jax.jit(functools.partial(forward, config, False))(
        params, latents, timesteps, context
    )
    # Float kernels, quantized inside (bit-identical to quantizing at load, tests/model), so the
    # interceptor still sees them for the bf16 linear on the same input.
    fp8, fp8_state = jax.jit(functools.partial(forward, config.replace(linear_quant="fp8"), True))(
        params, latents, timesteps, context
    )
    fp8, ref = np.asarray(fp8, np.float64), np.asarray(ref, np.float64)
    seconds = time.perf_counter() - start

    def rel(a, b, axes):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.sqrt(np.sum((a - b) ** 2, axes) / np.sum(b**2, axes))

    layers = {"stream": rel(fp8_state["stream"][0], ref_state["stream"][0], (1, 2, 3))}
    for module, short in _MODULES.items():
        for linear, value in fp8_state[module].items():
            sums = np.asarray(value["error_sums"][0], np.float64)  # [num_layers, 2]
            layers[f"{short}.{linear}"] = np.sqrt(sums[:, 0] / sums[:, 1])
    return {
        "case": name,
        "num_layers": config.num_layers,
        "tokens": tokens,
        "batch": batch,
        "output_rel_l2": float(rel(fp8, ref, None)),
        "output_scale": float(np.abs(ref).max()),
        "layers": {k: v.tolist() for k, v in layers.items()},
        "seconds": seconds,
    }


def table(r: dict) -> str:
    cols = ("stream", *COLUMNS)
    head = f"{r['case']} ({r['num_layers']} layers, B={r['batch']}, {r['tokens']:,} tokens)"
    lines = [head, "", "| layer | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    per = {c: np.asarray(r["layers"][c]) for c in cols}
    for i in range(r["num_layers"]):
        lines.append(f"| {i} | " + " | ".join(f"{per[c][i]:.4f}" for c in cols) + " |")
    lines.append("| mean | " + " | ".join(f"{per[c].mean():.4f}" for c in cols) + " |")
    lines.append(f"\nDiT output, rel L2 FP8 vs bf16 linears: {r['output_rel_l2']:.4f}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["1.3b-480p"], choices=sorted(CASES))
    parser.add_argument("--num_layers", type=int, default=None, help="blocks (default: preset's)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--linear_impl", default="cublaslt", choices=FP8_LINEAR_IMPLS)
    parser.add_argument("--impl", default="auto", choices=IMPLS, help="self-attention impl (dense)")
    args = parser.parse_args()
    try:
        check_backend(args.linear_impl)
    except ValueError as e:
        parser.error(str(e))
    if args.num_layers is not None and args.num_layers < 1:
        parser.error(f"--num_layers must be >= 1, got {args.num_layers}")
    device = jax.devices()[0]
    print(f"device: {device.device_kind}, jax {jax.__version__}; linear impl {args.linear_impl}")
    for name in args.cases:
        result = run_case(name, args.num_layers, args.batch, args.linear_impl, args.impl)
        print("\n" + table(result) + f"\n({result['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
