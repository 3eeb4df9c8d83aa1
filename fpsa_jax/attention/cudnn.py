"""Dense cuDNN baselines: bf16 flash attention and cuDNN's FP8 flash attention.

Neither serves a window or FPSA's tile-group quantization; both raise rather than silently
compute something else. `cudnn_fp8` goes through JAX's private fused-attention module, so it is
guarded by an import and signature check.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

from fpsa_jax.attention.config import E4M3_MAX, FPSAConfig

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def _require_gpu(impl: str) -> None:
    backend = jax.default_backend()
    if backend != "gpu":
        raise ValueError(
            f"impl={impl!r} needs an NVIDIA GPU (cuDNN), but the default JAX backend is "
            f"{backend!r}; use impl='xla' (any backend) or impl='reference' (small inputs)."
        )


def _require_dtype(impl: str, q) -> None:
    if q.dtype not in [jnp.dtype(t) for t in _CUDNN_DTYPES]:
        raise ValueError(
            f"impl={impl!r} takes bfloat16 or float16 inputs, got {q.dtype}; cast the inputs "
            f"or use impl='xla'."
        )


def cudnn_attention(q, k, v, *, grid, config: FPSAConfig | None, scale) -> jax.Array:
    """Dense bf16/fp16 attention with cuDNN. q, k, v: [B, L, N, D] -> [B, L, N, D].

    Accepts config=None or a config with window=None and quant="none" (dense, unquantized: the
    tile is irrelevant). `grid` is only validated by the caller.
    """
    del grid
    if config is not None and config.window is not None:
        raise ValueError(
            f"impl='cudnn' is dense-only and cannot apply window={config.window}; use impl='xla' "
            f"(or 'reference') for windowed attention, or window=None."
        )
    if config is not None and config.quant != "none":
        raise ValueError(
            f"impl='cudnn' is bf16-only and cannot apply quant={config.quant!r}; use impl='xla' "
            f"for FPSA's FP8, or impl='cudnn_fp8' with config=None for cuDNN's per-tensor FP8 "
            f"baseline."
        )
    _require_gpu("cudnn")
    _require_dtype("cudnn", q)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")


_FP8_PARAM_KEYS = (
    "amax_dQ",
    "amax_dK",
    "amax_dV",
    "amax_dP",
    "descale_q",
    "descale_k",
    "descale_v",
    "descale_s",
    "scale_s",
    "scale_o",
    "descale_o",
    "descale_dO",
    "descale_dP",
    "scale_dQ",
    "scale_dK",
    "scale_dV",
    "scale_dP",
)


def _private_fp8_attention():
    """JAX's private cuDNN fused-attention entry point, checked to take `use_fp8`/`fp8_params`."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except ImportError as e:
        raise NotImplementedError(
            f"impl='cudnn_fp8' needs jax._src.cudnn.fused_attention_stablehlo, which jax "
            f"{jax.__version__} does not provide ({e}); it was written against jax 0.11.2. Use "
            f"impl='cudnn' (bf16) or impl='xla'."
        ) from e
    fn = getattr(fa, "dot_product_attention", None)
    params = inspect.signature(fn).parameters if fn is not None else {}
    if not {"use_fp8", "fp8_params", "scale", "qkv_layout"} <= set(params):
        raise NotImplementedError(
            f"impl='cudnn_fp8': jax {jax.__version__}'s private "
            f"fused_attention_stablehlo.dot_product_attention lacks the use_fp8/fp8_params "
            f"interface this wrapper was written for (jax 0.11.2). Use impl='cudnn' or impl='xla'."
        )
    return fa


def _per_tensor_fp8(x):
    """Per-tensor E4M3: (values, s) with x ~= values * s, s = absmax / 448 (1 if x is all zero)."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)))
    s = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    values = jnp.clip(x.astype(jnp.float32) / s, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
    return values, s


def cudnn_fp8_attention(q, k, v, *, grid, config: FPSAConfig | None, scale) -> jax.Array:
    """Dense FP8 attention with cuDNN, the FP8 baseline. q, k, v: [B, L, N, D] bf16/fp16.

    Quantization is cuDNN's, not FPSA's: one scale per tensor for Q, K and V; P is scaled by 448
    before its FP8 cast (scale_s, as FPSA's static P scale); the output is produced in E4M3 with
    scale_o = 448 / absmax(V) (|o| <= absmax(V) since o is a convex combination of V rows) and
    dequantized to q's dtype, so the output carries an extra E4M3 rounding FPSA does not have.
    Only config=None is accepted: an FPSAConfig would promise tile-group scales this path lacks.
    Forward only is meant for benchmarking (cuDNN's FP8 backward needs D == 128 and L % 128 == 0).
    """
    del grid
    if config is not None:
        raise ValueError(
            "impl='cudnn_fp8' is a dense baseline with cuDNN's per-tensor FP8 scales and takes "
            f"config=None, got {config}; use impl='xla' for FPSA configs (windows, tile-group FP8)."
        )
    _require_gpu("cudnn_fp8")
    _require_dtype("cudnn_fp8", q)
    fa = _private_fp8_attention()
    d = q.shape[-1]
    if d % 16 or d > 256:
        raise ValueError(f"impl='cudnn_fp8' needs head dim D a multiple of 16 and <= 256, got {d}")
    (q8, s_q), (k8, s_k), (v8, s_v) = (_per_tensor_fp8(x) for x in (q, k, v))
    one = jnp.ones((1, 1, 1, 1), jnp.float32)
    as4 = lambda x: jnp.reshape(x, (1, 1, 1, 1)).astype(jnp.float32)
    params = {key: one for key in _FP8_PARAM_KEYS}
    params.update(
        descale_q=as4(s_q),
        descale_k=as4(s_k),
        descale_v=as4(s_v),
        scale_s=as4(E4M3_MAX),
        descale_s=as4(1.0 / E4M3_MAX),
        scale_o=as4(1.0 / s_v),
        descale_o=as4(s_v),
    )
    out8, _, _ = fa.dot_product_attention(
        q8, k8, v8, fp8_params=params, scale=float(scale), qkv_layout="BTNH", use_fp8=True
    )
    return (out8.astype(jnp.float32) * s_v).astype(q.dtype)
