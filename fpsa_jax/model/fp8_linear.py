"""FP8 (E4M3) linears of the DiT blocks (`WanConfig.linear_quant = "fp8"`, DESIGN.md section 7).

    y[..., n] = s_x[...] * s_w[n] * sum_k e4m3(x[..., k] / s_x[...]) * e4m3(W[k, n] / s_w[n]) + b[n]

- Weights W [K, N] (Flax layout, in x out): one scale per output channel, s_w[n] = absmax_k
  |W[k, n]| / 448 (1 for an all-zero column). Quantized once (`quantize_weight`, at load or by
  `python -m fpsa_jax.convert --linear_quant fp8`) or, for a float kernel, at every call (training
  sees it with a straight-through gradient).
- Activations x [..., K]: one scale per token (row), s_x = absmax over K / 448, computed at every
  call. Per token costs the FP8 GEMM nothing over per tensor: both scales factor out of the sum over
  k, so they multiply the GEMM's float32 output, where the per-channel weight scale must go anyway.
- The dot: E4M3 x E4M3 products summed in float32; then both scales, then the bias. "cublaslt"
  writes the float32 sums as bfloat16 before the scales (`GEMM_OUTPUT_DTYPES`).

Implementations (`Fp8LinearImpl`), same numbers up to the order of the float32 sums:
  cublaslt  both operands in float8_e4m3fn, converted to bfloat16 right at the dot, no scale in
            between: the dequantize-then-dot pattern that XLA's GEMM rewriter on Hopper turns into
            cuBLASLt's FP8 GEMM (custom call `__cublas$lt$matmul$f8`); `benchmarks/fp8_gemm.py`
            measures that this is the form that runs on FP8 tensor cores. Needs a GPU with FP8
            tensor cores: on any other backend it raises (`check_backend`), never runs as bf16.
            Inference only (a gradient through the float8 casts would be rounded to E4M3).
  emulated  the same E4M3 values, never in an FP8 dtype: bfloat16 operands (exact, E4M3 has 3
            mantissa bits) with float32 accumulation (a product of two E4M3 values is exact in
            float32), i.e. a float32 matmul of the quantized values. Runs anywhere, differentiable
            (straight-through: the gradient of the identity); CPU tests, benchmarks/quality.py
            and training use it.

Where the input comes from a LayerNorm (the blocks' modulated norms, the cross-attention's affine
norm: `quantize_normed_tokens`) or from fc1 (GELU, `quantize_gelu_tokens`: Fp8Dense's epilogue
"gelu_quantize"), the quantization includes its producer, and the next linear takes the
QuantizedTensor. Who writes it (`QuantizeWriter`): the jnp definitions here ("xla") or one
Triton pass per row (`pallas_kernels.triton_row_quant`), which "auto" picks for "cublaslt" on a
GPU with jax-triton: 18.7 -> 11.9 ms of quantize passes per 14B/720p layer (RESULTS.md).

Quantized tensors travel as `fpsa_jax.attention.quant.QuantizedTensor`: values float8_e4m3fn
(cublaslt, and weights quantized at load) or float32 holding E4M3 values (emulated, quantized at
the call); scales float32, [..., 1] per token for activations and [1, N] per channel for weights.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp

from fpsa_jax.attention.quant import (
    FP8,
    QuantizedTensor,
    e4m3_round,
    finite_abs,
    safe_scale,
    straight_through,
    to_e4m3,
)
from fpsa_jax.model import triton_passes
from fpsa_jax.model.norms import layer_norm
from fpsa_jax.model.pending_linear import PendingLinear

Array = jax.Array
Fp8LinearImpl = Literal["cublaslt", "emulated"]
FP8_LINEAR_IMPLS: tuple[str, ...] = get_args(Fp8LinearImpl)
# Who writes a linear's quantized input (`triton_passes`; the values are the same up to float32
# summation order): "xla" the jnp definitions below (any backend; reductions and converts as
# separate XLA passes), "triton" one pass per row fused with its producer
# (`pallas_kernels.triton_row_quant`; FP8 values for "cublaslt" on a GPU with jax-triton; no
# gradient), "auto" triton where it can run.
QuantizeWriter = triton_passes.Writer
# FP8 tensor cores: Ada (8.9), Hopper (9.0) and later.
MIN_COMPUTE_CAPABILITY = (8, 9)
# (module, linear) under the DiT's "blocks" of the matmuls that `linear_quant="fp8"` runs in FP8.
BLOCK_LINEARS: tuple[tuple[str, str], ...] = (
    *((attn, p) for attn in ("self_attn", "cross_attn") for p in "qkvo"),
    ("ffn", "fc1"),
    ("ffn", "fc2"),
)
WEIGHT_LAYOUT = "kernel:out_channel"
TOKEN_LAYOUT = "tokens:row"
# XLA options for a program that runs "cublaslt" FP8 linears (`jax.jit(...,
# compiler_options=...)`). By default XLA's GPU autotuner weighs Triton GEMM fusions against
# cuBLAS for every dot; with the activations quantized inside the program it fuses the quantize
# into a Triton FP8 GEMM, whose autotuning did not finish in 90 s for one 14B linear on an H200
# (benchmarks/fp8_compile_flags.sh, RESULTS.md). Without Triton GEMMs the dot becomes cuBLASLt's
# FP8 GEMM (`__cublas$lt$matmul$f8`), compiled in seconds; the bf16 GEMMs beside it go to
# cuBLASLt too, measured as fast at the DiT's shapes.
CUBLASLT_COMPILER_OPTIONS: dict[str, bool] = {"xla_gpu_enable_triton_gemm": False}


def check_impl(impl: str) -> Fp8LinearImpl:
    """`impl` when it names an implementation (one of `FP8_LINEAR_IMPLS`), else a ValueError
    listing them."""
    if not isinstance(impl, str) or impl not in FP8_LINEAR_IMPLS:
        raise ValueError(f"unknown FP8 linear impl {impl!r}; valid: {list(FP8_LINEAR_IMPLS)}")
    return impl


def fp8_gemm_support(device: jax.Device | None = None) -> str | None:
    """None when `device` (default: the first of the default backend) has FP8 tensor cores, else
    a phrase naming what it is instead."""
    device = device or jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or capability is None:
        return f"the backend is {device.platform} ({device.device_kind})"
    major, minor = (int(p) for p in str(capability).split(".")[:2])
    if (major, minor) < MIN_COMPUTE_CAPABILITY:
        return f"{device.device_kind} has compute capability {capability}"
    return None


def check_backend(impl: str, device: jax.Device | None = None) -> None:
    """Raises ValueError, naming the backend, when `impl` cannot run on `device` (default: the
    first device of the default backend): "cublaslt" needs FP8 tensor cores."""
    check_impl(impl)
    if impl != "cublaslt":
        return
    why = fp8_gemm_support(device)
    if why is not None:
        cc = ".".join(map(str, MIN_COMPUTE_CAPABILITY))
        raise ValueError(
            f"FP8 linears (impl 'cublaslt') need an NVIDIA GPU with FP8 tensor cores (compute "
            f"capability >= {cc}), but {why}; impl 'emulated' computes the same values with a "
            f"float32 matmul"
        )


def compiler_options(linear_quant: str, impl: str) -> dict[str, bool]:
    """The XLA options a program running `linear_quant` block linears by `impl` needs (pass to
    `jax.jit(compiler_options=...)`): `CUBLASLT_COMPILER_OPTIONS` for "fp8" by "cublaslt", else
    none."""
    check_impl(impl)
    return dict(CUBLASLT_COMPILER_OPTIONS) if linear_quant == "fp8" and impl == "cublaslt" else {}


def _quantize(x: Array, axis: int, impl: str, layout: str) -> QuantizedTensor:
    """x scaled by absmax(|x|) / 448 along `axis` (scales stop-gradient) and rounded to E4M3."""
    xf = x.astype(jnp.float32)
    scales = jax.lax.stop_gradient(safe_scale(finite_abs(xf).max(axis=axis, keepdims=True)))
    scaled = xf / scales
    if impl == "cublaslt":
        values = to_e4m3(scaled)
    else:  # float32 on the E4M3 grid, gradient of the identity
        values = straight_through(scaled, e4m3_round(scaled))
    return QuantizedTensor(values, scales, layout=layout)


def quantize_weight(kernel: Array, impl: str = "cublaslt") -> QuantizedTensor:
    """kernel [..., K, N] -> values [..., K, N], scales float32 [..., 1, N] (per output channel).

    A leading layers axis (stacked blocks) is allowed. impl "cublaslt" gives float8_e4m3fn
    values (what checkpoints store), "emulated" float32 values with a straight-through gradient.
    """
    check_impl(impl)
    return _quantize(kernel, -2, impl, WEIGHT_LAYOUT)


def quantize_tokens(x: Array, impl: str, *, writer: QuantizeWriter = "auto") -> QuantizedTensor:
    """x [..., K] -> values [..., K], scales float32 [..., 1] (one per token)."""
    if _use_triton(writer, impl, x.shape[-1]):
        return _triton_tokens(x, "none")
    return _quantize(x, -1, impl, TOKEN_LAYOUT)


def quantize_normed_tokens(
    x: Array, mul: Array, add: Array, eps: float, impl: str, *, writer: QuantizeWriter = "auto"
) -> QuantizedTensor:
    """`quantize_tokens(layer_norm(x, eps) * mul + add)`: a LayerNorm (+ modulation, or its own
    affine) feeding FP8 linears, in one pass with writer "triton".

    x [B, L, K] (the float32 residual stream); mul, add float32 broadcastable to [B, 1, K] (1 +
    scale and shift of a block's modulation, or an affine LayerNorm's scale and bias).
    """
    if _use_triton(writer, impl, x.shape[-1]):
        b, _, k = x.shape
        mul, add = (jnp.broadcast_to(v, (b, 1, k)).reshape(b, k) for v in (mul, add))
        return _triton_tokens(x, "layernorm", mul, add, eps=eps)
    return _quantize(layer_norm(x, eps) * mul + add, -1, impl, TOKEN_LAYOUT)


def quantize_gelu_tokens(
    acc: Array,
    x: QuantizedTensor,
    w: QuantizedTensor,
    bias: Array,
    impl: str,
    *,
    writer: QuantizeWriter = "auto",
) -> QuantizedTensor:
    """fc1's FP8 GEMM sums -> fc2's quantized input: `quantize_tokens(gelu_tanh(acc * x.scales *
    w.scales + bias))`, all in float32, in one pass with writer "triton".

    acc [..., F]: `fp8_gemm(x, w)` (bfloat16 for "cublaslt"); x.scales [..., 1]; w.scales [1, F];
    bias [F].
    """
    if _use_triton(writer, impl, acc.shape[-1]):
        return _triton_tokens(acc, "gelu", x.scales, w.scales.reshape(-1), bias)
    y = acc.astype(jnp.float32) * x.scales * w.scales + bias.astype(jnp.float32)
    return _quantize(jax.nn.gelu(y, approximate=True), -1, impl, TOKEN_LAYOUT)


def triton_quantize_support(impl: str, k: int) -> str | None:
    """None when writer "triton" can write `impl`'s quantized rows of `k` values here, else a
    phrase naming why not."""
    from pallas_kernels import triton_row_quant

    if impl != "cublaslt":
        return f"impl {impl!r} quantizes in float32 with a straight-through gradient"
    if k > triton_row_quant.MAX_ROW:
        return f"rows of {k} values exceed the kernel's {triton_row_quant.MAX_ROW}"
    return triton_passes.triton_support()


def _use_triton(writer: str, impl: str, k: int) -> bool:
    return triton_passes.use_triton(writer, triton_quantize_support(impl, k), "quantize")


def _triton_tokens(x: Array, prologue: str, *operands: Array, eps: float = 0.0) -> QuantizedTensor:
    from pallas_kernels import triton_row_quant

    with jax.named_scope("fp8_row_quant"):  # how benchmarks/layer_profile.py finds it
        values, scales = triton_row_quant.quantize_rows(x, prologue, *operands, eps=eps)
    return QuantizedTensor(values, scales, layout=TOKEN_LAYOUT)


def fp8_matmul(x: QuantizedTensor, w: QuantizedTensor, impl: str) -> Array:
    """x [..., K] (per-token scales [..., 1]) @ w [K, N] (per-channel scales [1, N]) -> float32
    [..., N]: the E4M3 values multiplied with float32 accumulation, then both scales.

    Checks that `impl` can run here (`check_backend`), then computes `scaled_fp8_dot`.
    """
    _check_operands(x, w, impl)
    return scaled_fp8_dot(x, w, GEMM_OUTPUT_DTYPES[impl])


def _check_operands(x: QuantizedTensor, w: QuantizedTensor, impl: str) -> None:
    check_backend(impl)
    if impl == "cublaslt" and (x.values.dtype != FP8 or w.values.dtype != FP8):
        raise ValueError(
            f"impl 'cublaslt' multiplies {jnp.dtype(FP8)} values, got {x.values.dtype} and "
            f"{w.values.dtype}"
        )


# The GEMM's output dtype per impl. cuBLASLt accumulates in float32 either way; writing the sums
# as bfloat16 (one rounding, 2^-9 relative, beside E4M3's 2^-4) halves the bytes the GEMM writes
# and the scale pass reads: +4-19% per FP8 linear on an H200 (benchmarks/fp8_gemm.py: now "(b)
# model, linear" against "(b) float32 GEMM output, linear"; RESULTS.md). "emulated" keeps the
# float32 sums: it is the reference the tests compare against.
GEMM_OUTPUT_DTYPES: dict[str, Any] = {"cublaslt": jnp.bfloat16, "emulated": jnp.float32}


def scaled_fp8_dot(x: QuantizedTensor, w: QuantizedTensor, gemm_dtype=jnp.float32) -> Array:
    """The dot of `fp8_matmul` without the backend check (benchmarks/fp8_gemm.py times it).

    Values go to the dot as bfloat16 (a float8 operand is converted right there, the pattern of
    XLA's FP8 GEMM rewrite); float32 accumulation, the sums written in `gemm_dtype`; the scales
    multiply them in float32. Returns float32 [..., N].
    """
    return fp8_gemm(x, w, gemm_dtype).astype(jnp.float32) * x.scales * w.scales


def fp8_gemm(x: QuantizedTensor, w: QuantizedTensor, gemm_dtype=jnp.float32) -> Array:
    """The E4M3 values' dot, x.values [..., K] @ w.values [K, N] -> [..., N] in `gemm_dtype`
    (float32 accumulation), scales not applied: bfloat16 operands (a float8 operand converted
    right at the dot, the pattern of XLA's FP8 GEMM rewrite)."""
    xv, wv = x.values, w.values
    return jax.lax.dot_general(
        xv.astype(jnp.bfloat16),
        wv.astype(jnp.bfloat16),
        (((xv.ndim - 1,), (0,)), ((), ())),
        preferred_element_type=gemm_dtype,
    )


Fp8Epilogue = Literal["linear", "gelu_quantize", "pending"]


class Fp8Dense(nn.Module):
    """`nn.Dense` with the FP8 matmul above: x [..., K] -> [..., features] in `dtype`.

    x is a float array (quantized per token here, `quantize_tokens`) or a `QuantizedTensor`
    already quantized per token (`quantize_normed_tokens`, or another Fp8Dense's "gelu_quantize"
    output). epilogue "linear" returns x @ W + b; "gelu_quantize" returns the next linear's input,
    `quantize_gelu_tokens` of the GEMM (GELU(x @ W + b) quantized per token, as a QuantizedTensor);
    "pending" returns x @ W + b as a `PendingLinear` (the GEMM's sums, scales and bias) for the
    consumer to finish (the q/k RMSNorm, `norms.rms_norm`).

    Parameters: kernel [K, features] and bias [features] as nn.Dense (initialised in
    `param_dtype`). A float kernel is quantized at every call; a float8_e4m3fn kernel (quantized
    at load, `quantize_weight`) comes with kernel_scale float32 [features].
    """

    features: int
    axes: tuple[str | None, str | None]
    dtype: Any
    param_dtype: Any
    impl: str
    kernel_init: Any = nn.initializers.xavier_uniform()
    epilogue: Fp8Epilogue = "linear"

    @nn.compact
    def __call__(self, x: Array | QuantizedTensor) -> Array | QuantizedTensor:
        check_impl(self.impl)
        if self.epilogue not in get_args(Fp8Epilogue):
            raise ValueError(f"unknown epilogue {self.epilogue!r}; valid: {get_args(Fp8Epilogue)}")
        if isinstance(x, QuantizedTensor) and x.layout != TOKEN_LAYOUT:
            raise ValueError(f"Fp8Dense takes per-token scales ({TOKEN_LAYOUT}), got {x.layout}")
        x_q = x if isinstance(x, QuantizedTensor) else quantize_tokens(x, self.impl)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.axes),
            (x_q.values.shape[-1], self.features),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
            (self.features,),
            self.param_dtype,
        )
        if kernel.dtype == FP8:
            scale = self.param(
                "kernel_scale",
                nn.with_logical_partitioning(nn.initializers.ones, (self.axes[1],)),
                (self.features,),
                jnp.float32,
            )
            w = QuantizedTensor(kernel, scale[None, :], layout=WEIGHT_LAYOUT)
        else:
            w = quantize_weight(kernel, self.impl)
        if self.epilogue == "gelu_quantize":
            _check_operands(x_q, w, self.impl)
            acc = fp8_gemm(x_q, w, GEMM_OUTPUT_DTYPES[self.impl])
            return quantize_gelu_tokens(acc, x_q, w, bias, self.impl)
        if self.epilogue == "pending":
            _check_operands(x_q, w, self.impl)
            acc = fp8_gemm(x_q, w, GEMM_OUTPUT_DTYPES[self.impl])
            return PendingLinear(acc, bias.astype(jnp.float32), x_q.scales, w.scales, self.dtype)
        y = fp8_matmul(x_q, w, self.impl)
        return (y + bias.astype(jnp.float32)).astype(self.dtype)


# -- the DiT's parameter tree --------------------------------------------------------------


def quantize_linear_weights(params: Any) -> Any:
    """`params` with every block linear (`BLOCK_LINEARS`) quantized once for `linear_quant="fp8"`.

    Each kernel [layers, K, N] becomes float8_e4m3fn values [layers, K, N] plus a float32
    kernel_scale [layers, N] (per output channel, `fp8_linear.quantize_weight`): half the bytes of
    bf16. Every other leaf is returned as it is. Deterministic: the same float kernels always give
    the same bits, whether quantized at load or by `python -m fpsa_jax.convert --linear_quant fp8`.
    """
    quantize = jax.jit(quantize_weight)

    def one(linear):
        if "kernel_scale" in linear or jnp.dtype(linear["kernel"].dtype) == FP8:
            raise ValueError("params are already quantized (their block linears hold FP8 kernels)")
        q = quantize(linear["kernel"])
        return {**linear, "kernel": q.values, "kernel_scale": q.scales[..., 0, :]}

    return _map_block_linears(params, one)


def is_quantized(params: Any) -> bool:
    """True when `params` holds FP8 block linears (`quantize_linear_weights`)."""
    blocks = params.get("blocks", {}) if isinstance(params, dict) else {}
    return any("kernel_scale" in blocks.get(m, {}).get(n, {}) for m, n in BLOCK_LINEARS)


def _map_block_linears(tree: Any, fn) -> Any:
    """`tree` (params or their specs) with tree["blocks"][module][linear] replaced by fn(it)."""
    blocks = dict(tree["blocks"])
    for module, name in BLOCK_LINEARS:
        blocks[module] = {**blocks[module], name: fn(blocks[module][name])}
    return {**tree, "blocks": blocks}


def quantized_logical_axes(specs: Any) -> Any:
    """Logical PartitionSpecs of the DiT's float params -> those of `quantize_linear_weights`'s
    tree: each kernel_scale [layers, N] is named like its kernel's (layers, N) axes."""
    scale_spec = lambda k: jax.sharding.PartitionSpec(k[0], k[2])  # noqa: E731
    return _map_block_linears(specs, lambda lin: {**lin, "kernel_scale": scale_spec(lin["kernel"])})
