"""The Wan2.1 text-to-video DiT in Flax linen, computing what the original `model.py` does.

Latents are channels-last [B, F, H, W, C]; after the (1, 2, 2) patchify the tokens form the grid
(T, H', W') = (F, H/2, W/2) in row-major order, L = T * H' * W'. Matmuls and attention run in
`config.dtype`; the time embedding, modulation sums, norms, RoPE, the gated residual stream and the
head stay float32, as in the original (its residual stream is float32 after the first block).

Self-attention goes through `fpsa_jax.attention.fpsa_attention`, given the token grid and a
per-call `FPSAConfig` (None = dense), by way of `fpsa_jax.parallel.ulysses_attention`: under a
mesh in context whose 'seq' axis is larger than one (`fpsa_jax.parallel.use_sharding`) it runs
sequence-parallel (Ulysses), otherwise it is exactly `fpsa_attention`. Cross-attention over the
text rows is dense (`text_attention`: cuDNN's flash attention on a GPU, einsums elsewhere and
under a multi-device mesh). Parameters carry logical
axis names ('embed', 'heads', 'mlp', 'layers', ...) and activations logical constraints, so a mesh
can shard them; both are no-ops without one. The blocks run under `nn.scan` (parameters stacked on
a leading 'layers' axis) with the remat policy of `config.remat`.

With `config.linear_quant == "fp8"` the block linears (`fp8_linear.BLOCK_LINEARS`) are `Fp8Dense`
computed by `linear_impl`; their kernels are float (quantized at every call, as training needs) or
FP8 with a `kernel_scale` (`fp8_linear.quantize_linear_weights`, at load). There the LayerNorms
that feed linears (and fc1's GELU) quantize their output per token in the same pass
(`_normed_input`, `Fp8Dense(epilogue="gelu_quantize")`), so q/k/v, cross q, fc1 and fc2 receive
a `QuantizedTensor`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from fpsa_jax.attention import FPSAConfig, Impl
from fpsa_jax.attention.cudnn import cudnn_attention
from fpsa_jax.attention.quant import QuantizedTensor
from fpsa_jax.config import WanConfig
from fpsa_jax.model.embeddings import apply_rope, fit_text_length, rope_tables, sinusoidal_embedding
from fpsa_jax.model.fp8_linear import (
    Fp8Dense,
    Fp8LinearImpl,
    is_quantized,
    quantize_normed_tokens,
    quantized_logical_axes,
)
from fpsa_jax.model.norms import RopeTables, layer_norm, rms_norm
from fpsa_jax.model.pending_linear import PendingDense, PendingLinear
from fpsa_jax.parallel import ulysses_attention

Array = jax.Array
_F32 = jnp.float32

_REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


_XAVIER = nn.initializers.xavier_uniform()


def _dense_options(axes: tuple[str | None, str | None], dtype: Any, param_dtype: Any, init=_XAVIER):
    # float32 islands ask for full-precision dots (GPUs would otherwise use TF32).
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == _F32 else None
    return dict(
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
        kernel_init=nn.with_logical_partitioning(init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
    )


def _dense(
    features: int,
    axes: tuple[str | None, str | None],
    dtype: Any,
    param_dtype: Any,
    name: str,
    init: Any = _XAVIER,
) -> nn.Dense:
    return nn.Dense(features, name=name, **_dense_options(axes, dtype, param_dtype, init))


def _block_dense(
    cfg: WanConfig,
    features: int,
    axes: tuple[str, str],
    linear_impl: Fp8LinearImpl,
    name: str,
    epilogue: str = "linear",
) -> nn.Module:
    """A block linear: FP8 under `cfg.linear_quant == "fp8"` (with `epilogue`, see `Fp8Dense`),
    else nn.Dense in cfg.dtype (epilogue "pending": `PendingDense`, its output a
    `PendingLinear`)."""
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if cfg.linear_quant == "fp8":
        return Fp8Dense(features, axes, dt, pdt, linear_impl, epilogue=epilogue, name=name)
    if epilogue == "pending":
        return PendingDense(features, name=name, **_dense_options(axes, dt, pdt))
    return _dense(features, axes, dt, pdt, name)


def _normed_input(
    cfg: WanConfig, linear_impl: Fp8LinearImpl, x: Array, mul: Array, add: Array
) -> Array | QuantizedTensor:
    """layer_norm(x) * mul + add, the input of block linears: float32, or under FP8 linears
    already quantized per token (one pass with the norm, `quantize_normed_tokens`)."""
    if cfg.linear_quant == "fp8":
        return quantize_normed_tokens(x, mul, add, cfg.eps, linear_impl)
    return layer_norm(x, cfg.eps) * mul + add


class AffineLayerNorm(nn.Module):
    """LayerNorm with a learned scale and bias (the cross-attention norm); float32 out, or with
    `config` under FP8 linears its per-token quantization (`_normed_input`)."""

    eps: float
    param_dtype: Any
    config: WanConfig | None = None
    linear_impl: Fp8LinearImpl = "cublaslt"

    @nn.compact
    def __call__(self, x: Array) -> Array | QuantizedTensor:
        dim = x.shape[-1]
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (dim,),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            (dim,),
            self.param_dtype,
        )
        if self.config is not None:
            return _normed_input(
                self.config, self.linear_impl, x, scale.astype(_F32), bias.astype(_F32)
            )
        return layer_norm(x, self.eps) * scale.astype(_F32) + bias.astype(_F32)


class RMSNorm(nn.Module):
    """Wan's RMSNorm over the whole model dim (`norms.rms_norm`: normalise in float32, back to x's
    dtype, times the float32 weight), optionally with the self-attention's RoPE after it; float32
    out by default, as in the original."""

    eps: float
    param_dtype: Any

    @nn.compact
    def __call__(
        self,
        x: Array | PendingLinear,
        rope: RopeTables | None = None,
        head_dim: int | None = None,
        out_dtype: Any = _F32,
    ) -> Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("heads",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        return rms_norm(x, scale, self.eps, rope, head_dim=head_dim, out_dtype=out_dtype)


class Attention(nn.Module):
    """Multi-head attention of a Wan block: q/k/v/o projections with bias and RMS q/k norms.

    Self-attention (grid set) rotates q, k with 3D RoPE and calls the FPSA operator on the token
    grid; cross-attention (grid None) attends all text rows densely.
    """

    config: WanConfig
    grid: tuple[int, int, int] | None = None
    attention: FPSAConfig | None = None
    attention_impl: Impl = "auto"
    linear_impl: Fp8LinearImpl = "cublaslt"

    def qkv(
        self, x: Array | QuantizedTensor, context: Array | None = None
    ) -> tuple[Array, Array, Array]:
        """The operator's inputs q, k, v [B, L (Lt for k, v), N, D] in config.dtype: projected,
        RMS-normed, and for self-attention rotated (RoPE). Its own method so that a Flax
        interceptor can observe them (`fpsa_jax.sampling.attention_probe`). x may come quantized
        per token (FP8 linears, `_normed_input`)."""
        cfg = self.config
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        n, d = cfg.num_heads, cfg.head_dim
        kv_input = x if context is None else context
        axes = ("embed", "heads")
        # Before a q/k norm the projections stay pending: the norm's pass applies their bias
        # (and FP8 scales) on the way in (`PendingLinear`).
        qk_epilogue = "pending" if cfg.qk_norm else "linear"
        q = _block_dense(cfg, cfg.dim, axes, self.linear_impl, "q", qk_epilogue)(x)
        k = _block_dense(cfg, cfg.dim, axes, self.linear_impl, "k", qk_epilogue)(kv_input)
        v = _block_dense(cfg, cfg.dim, axes, self.linear_impl, "v")(kv_input)
        rope = rope_tables(self.grid, cfg.rope_dims) if self.grid is not None else None
        b = q.shape[0]
        if cfg.qk_norm:  # norm and RoPE in one pass per token where Triton can write it
            q = RMSNorm(cfg.eps, pdt, name="norm_q")(q, rope, d, dt)
            k = RMSNorm(cfg.eps, pdt, name="norm_k")(k, rope, d, dt)
        elif rope is not None:
            q, k = (apply_rope(t.reshape(b, -1, n, d), *rope) for t in (q, k))
        q, k, v = (t.reshape(b, -1, n, d).astype(dt) for t in (q, k, v))
        return q, k, v

    @nn.compact
    def __call__(self, x: Array | QuantizedTensor, context: Array | None = None) -> Array:
        """x: [B, L, dim] (or quantized per token); context: [B, Lt, dim] (cross-attention) or
        None. Returns [B, L, dim]."""
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        n, d = cfg.num_heads, cfg.head_dim
        q, k, v = self.qkv(x, context)
        if self.grid is not None:
            out = ulysses_attention(  # fpsa_attention, sequence-parallel under a 'seq' mesh
                q, k, v, grid=self.grid, config=self.attention, impl=self.attention_impl
            )
        else:
            out = text_attention(q, k, v)
        out = nn.with_logical_constraint(out.astype(dt), ("batch", "length", "heads", "kv"))
        o = _block_dense(cfg, cfg.dim, ("heads", "embed"), self.linear_impl, "o")
        return o(out.reshape(out.shape[0], -1, n * d))


TextAttentionImpl = Literal["auto", "cudnn", "xla"]


def text_attention(q: Array, k: Array, v: Array, impl: TextAttentionImpl = "auto") -> Array:
    """Dense cross-attention over every text row: q [B, L, N, D], k, v [B, Lt, N, D] -> [B, L,
    N, D] in q's dtype; softmax in float32, probabilities rounded to q's dtype for the weighted
    sum (both impls).

    impl "xla": two einsums and a softmax (any backend; float32 inputs at HIGHEST precision).
    They write the [B, N, L, Lt] float32 scores to memory: at 14B/720p with the CFG pair that is
    12 GB per layer, 11 ms of the layer on an H200 (benchmarks/layer_profile.py).
    "cudnn": cuDNN's flash attention (`jax.nn.dot_product_attention`), scores kept on chip; the
    gradient by cuDNN where both lengths are multiples of 64, else by the einsums.
    "auto": cudnn on a GPU for bfloat16/float16 inputs with D a multiple of 8 up to 128 and no
    multi-device mesh in context (under a mesh the einsums shard as the tokens do), else xla.
    """
    if impl not in ("auto", "cudnn", "xla"):
        raise ValueError(f"text attention impl must be auto, cudnn or xla, got {impl!r}")
    if impl == "auto":
        impl = "cudnn" if _cudnn_text_attention_fits(q) else "xla"
    elif impl == "cudnn" and jax.default_backend() != "gpu":  # text attention's own alternatives
        raise ValueError(
            f"text attention impl 'cudnn' needs an NVIDIA GPU, but the default JAX backend is "
            f"{jax.default_backend()!r}; use 'xla' or 'auto'"
        )
    with jax.named_scope("cross_attention_core"):
        return _cudnn_text_attention(q, k, v) if impl == "cudnn" else _xla_text_attention(q, k, v)


def _xla_text_attention(q: Array, k: Array, v: Array) -> Array:
    dt = q.dtype
    precision = jax.lax.Precision.HIGHEST if dt == _F32 else None
    logits = jnp.einsum(
        "blnd,bknd->bnlk", q, k, preferred_element_type=_F32, precision=precision
    ) / math.sqrt(q.shape[-1])
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    return jnp.einsum("bnlk,bknd->blnd", probs, v, precision=precision)


def _cudnn_flash(q: Array, k: Array, v: Array) -> Array:
    """Dense cuDNN attention (raises off a GPU or for non-16-bit inputs, naming the problem)."""
    return cudnn_attention(q, k, v, grid=None, config=None, scale=None)


@jax.custom_vjp
def _cudnn_text_attention(q: Array, k: Array, v: Array) -> Array:
    """cuDNN's forward. Its backward (JAX's cuDNN rule) only takes sequence lengths that are
    multiples of 64 (Wan's 32,760 tokens at 480p are not), so the gradient is recomputed: by
    cuDNN's own rule where the lengths allow, else by the XLA einsums (same formula)."""
    return _cudnn_flash(q, k, v)


def _cudnn_text_attention_fwd(q, k, v):
    return _cudnn_flash(q, k, v), (q, k, v)


def _cudnn_text_attention_bwd(residuals, g):
    q, k, v = residuals
    trainable = q.shape[1] % 64 == 0 and k.shape[1] % 64 == 0
    _, pullback = jax.vjp(_cudnn_flash if trainable else _xla_text_attention, q, k, v)
    return pullback(g)


_cudnn_text_attention.defvjp(_cudnn_text_attention_fwd, _cudnn_text_attention_bwd)


def _cudnn_text_attention_fits(q: Array) -> bool:
    d = q.shape[-1]
    mesh = jax.sharding.get_abstract_mesh()
    return (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and d % 8 == 0
        and d <= 128
        and (mesh.empty or mesh.size == 1)
    )


class FeedForward(nn.Module):
    """Linear(dim, ffn_dim), GELU (tanh), Linear(ffn_dim, dim); [B, L, dim] -> [B, L, dim]."""

    config: WanConfig
    linear_impl: Fp8LinearImpl = "cublaslt"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        fc2 = _block_dense(cfg, cfg.dim, ("mlp", "embed"), self.linear_impl, "fc2")
        if cfg.linear_quant == "fp8":  # GELU in fc1's epilogue, with fc2's quantize
            fc1 = _block_dense(
                cfg, cfg.ffn_dim, ("embed", "mlp"), self.linear_impl, "fc1", "gelu_quantize"
            )
            h = fc1(x)
            values = nn.with_logical_constraint(h.values, ("batch", "length", "mlp"))
            return fc2(h.replace(values=values))
        y = _block_dense(cfg, cfg.ffn_dim, ("embed", "mlp"), self.linear_impl, "fc1")(x)
        y = nn.with_logical_constraint(y, ("batch", "length", "mlp"))
        return fc2(nn.gelu(y, approximate=True))


class WanBlock(nn.Module):
    """One DiT block: modulated self-attention, cross-attention, modulated FFN (gated residuals)."""

    config: WanConfig
    grid: tuple[int, int, int]
    attention: FPSAConfig | None = None
    attention_impl: Impl = "auto"
    linear_impl: Fp8LinearImpl = "cublaslt"

    @nn.compact
    def __call__(self, x: Array, e0: Array, context: Array) -> tuple[Array, None]:
        """x: [B, L, dim] float32; e0: [B, 6, dim] float32; context: [B, text_len, dim]."""
        cfg = self.config
        pdt = jnp.dtype(cfg.param_dtype)
        modulation = self.param(
            "modulation",
            nn.with_logical_partitioning(nn.initializers.normal(cfg.dim**-0.5), (None, "embed")),
            (6, cfg.dim),
            pdt,
        )
        mods = modulation.astype(_F32)[None] + e0
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (
            mods[:, i : i + 1] for i in range(6)
        )

        lin = self.linear_impl
        h = _normed_input(cfg, lin, x, 1 + scale_sa, shift_sa)
        y = Attention(cfg, self.grid, self.attention, self.attention_impl, lin, name="self_attn")(h)
        x = x + y.astype(_F32) * gate_sa

        if cfg.cross_attn_norm:
            h = AffineLayerNorm(cfg.eps, pdt, cfg, lin, name="cross_attn_norm")(x)
        else:
            h = x
        x = x + Attention(cfg, linear_impl=lin, name="cross_attn")(h, context).astype(_F32)

        h = _normed_input(cfg, lin, x, 1 + scale_ff, shift_ff)
        x = x + FeedForward(cfg, lin, name="ffn")(h).astype(_F32) * gate_ff
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class WanModel(nn.Module):
    """The Wan2.1 T2V DiT.

    __call__(latents [B, F, H, W, C], timesteps [B] (0..1000), context [B, Lt, text_dim],
    attention=FPSAConfig | None, condition=None, deterministic=True) -> [B, F, H, W, out_dim]
    float32. condition [B or 1, F, H, W, in_dim - C] is Wan I2V's `y`: channels concatenated to
    the noisy latents before the patch embedding, never noised (None: C = in_dim).
    `attention_impl` picks the FPSA operator's implementation (see fpsa_jax.attention);
    `linear_impl` the FP8 linears' under `config.linear_quant == "fp8"` ("cublaslt" needs FP8
    tensor cores, "emulated" runs anywhere; see fpsa_jax.model.fp8_linear).
    """

    config: WanConfig
    attention_impl: Impl = "auto"
    linear_impl: Fp8LinearImpl = "cublaslt"

    @nn.compact
    def __call__(
        self,
        latents: Array,
        timesteps: Array,
        context: Array,
        attention: FPSAConfig | None = None,
        condition: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        del deterministic  # Wan has no dropout; kept for the familiar Flax signature.
        cfg = self.config
        if not self.is_initializing():
            _check_linear_params(cfg, self.variables.get("params", {}))
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        latents = _with_condition(latents, condition)
        b, f, h, w, _ = _check_inputs(cfg, latents, timesteps, context)
        pt, ph, pw = cfg.patch_size
        grid = (f // pt, h // ph, w // pw)
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))

        # Patchify as a matmul: rows of the kernel ordered (pt, ph, pw, C), like Conv3d's weight.
        x = latents.reshape(b, grid[0], pt, grid[1], ph, grid[2], pw, cfg.in_dim)
        x = jnp.einsum("bTpHqWrc->bTHWpqrc", x).reshape(b, math.prod(grid), -1)
        x = _dense(cfg.dim, (None, "embed"), dt, pdt, "patch_embedding")(x.astype(dt))
        x = nn.with_logical_constraint(x.astype(_F32), ("batch", "length", "embed"))

        # Time embedding and its six-way projection, float32 throughout.
        normal = nn.initializers.normal(0.02)
        t = sinusoidal_embedding(timesteps, cfg.freq_dim)
        e = TwoLayerMLP(
            cfg.dim, nn.silu, _F32, pdt, (None, "embed"), normal, name="time_embedding"
        )(t)
        e0 = _dense(6 * cfg.dim, ("embed", "mlp"), _F32, pdt, "time_projection")(nn.silu(e))
        e0 = e0.reshape(b, 6, cfg.dim)

        context = fit_text_length(context, cfg.text_len).astype(dt)
        gelu = lambda y: nn.gelu(y, approximate=True)  # noqa: E731
        context = TwoLayerMLP(
            cfg.dim, gelu, dt, pdt, (None, "embed"), normal, name="text_embedding"
        )(context)

        blocks = _scanned_blocks(cfg, grid, attention, self.attention_impl, self.linear_impl)
        x = blocks(x, e0, context)[0]
        x = Head(cfg, name="head")(x, e)

        # Unpatchify: the head's channels are ordered (pt, ph, pw, C), C fastest.
        x = x.reshape(b, *grid, pt, ph, pw, cfg.out_dim)
        x = jnp.einsum("bTHWpqrc->bTpHqWrc", x)
        return x.reshape(b, f, h, w, cfg.out_dim)


class TwoLayerMLP(nn.Module):
    """Linear, activation, Linear (the time and text embeddings), keys linear_1 / linear_2."""

    features: int
    activation: Any
    dtype: Any
    param_dtype: Any
    in_axes: tuple[str | None, str | None]
    init: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = _dense(
            self.features, self.in_axes, self.dtype, self.param_dtype, "linear_1", self.init
        )(x.astype(self.dtype))
        return _dense(
            self.features, ("mlp", "embed"), self.dtype, self.param_dtype, "linear_2", self.init
        )(self.activation(x))


class Head(nn.Module):
    """Output head: LayerNorm modulated by (head.modulation + e), then Linear to patch * out_dim."""

    config: WanConfig

    @nn.compact
    def __call__(self, x: Array, e: Array) -> Array:
        """x: [B, L, dim] float32; e: [B, dim] float32 (time embedding before SiLU)."""
        cfg = self.config
        pdt = jnp.dtype(cfg.param_dtype)
        modulation = self.param(
            "modulation",
            nn.with_logical_partitioning(nn.initializers.normal(cfg.dim**-0.5), (None, "embed")),
            (2, cfg.dim),
            pdt,
        )
        mods = modulation.astype(_F32)[None] + e[:, None, :]
        shift, scale = mods[:, 0:1], mods[:, 1:2]
        x = layer_norm(x, cfg.eps) * (1 + scale) + shift
        # Zero-initialised like the original, so a fresh model predicts zeros.
        return _dense(
            cfg.out_dim * cfg.patch_volume,
            ("embed", None),
            _F32,
            pdt,
            "head",
            nn.initializers.zeros,
        )(x)


def _scanned_blocks(
    cfg: WanConfig,
    grid: tuple[int, int, int],
    attention: FPSAConfig | None,
    attention_impl: Impl,
    linear_impl: Fp8LinearImpl,
) -> nn.Module:
    block = WanBlock
    if cfg.remat != "none":
        block = nn.remat(WanBlock, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
    scanned = nn.scan(
        block,
        # "intermediates": what blocks sow (e.g. fpsa_jax.demo.attention_trace), stacked per layer.
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(cfg, grid, attention, attention_impl, linear_impl, name="blocks")


def _with_condition(latents: Array, condition: Array | None) -> Array:
    """latents [B, F, H, W, C] and condition [B or 1, F, H, W, C'] -> [B, F, H, W, C + C']."""
    if condition is None:
        return latents
    if (
        latents.ndim != 5
        or condition.ndim != 5
        or condition.shape[1:4] != latents.shape[1:4]
        or condition.shape[0] not in (1, latents.shape[0])
    ):
        raise ValueError(
            f"condition must be [B or 1, F, H, W, C'] matching latents {latents.shape} in "
            f"B, F, H, W; got shape {condition.shape}"
        )
    condition = jnp.broadcast_to(condition, (*latents.shape[:4], condition.shape[-1]))
    return jnp.concatenate([latents, condition.astype(latents.dtype)], axis=-1)


def _check_inputs(
    cfg: WanConfig, latents: Array, timesteps: Array, context: Array
) -> tuple[int, int, int, int, int]:
    if latents.ndim != 5:
        raise ValueError(
            f"latents must be [B, F, H, W, C] (channels last), got shape {latents.shape}"
        )
    b, f, h, w, c = latents.shape
    if c != cfg.in_dim:
        raise ValueError(
            f"latents have {c} channels but the model expects in_dim={cfg.in_dim} "
            f"(shape {latents.shape}, condition channels included; latents are channels-last "
            f"[B, F, H, W, C])"
        )
    for axis, size, p in zip("FHW", (f, h, w), cfg.patch_size, strict=True):
        if size % p:
            raise ValueError(
                f"latent {axis}={size} is not a multiple of the patch size {p} "
                f"along {axis} (patch_size={cfg.patch_size}); latent height and "
                f"width must be even"
            )
    if jnp.ndim(timesteps) not in (0, 1) or (
        jnp.ndim(timesteps) == 1 and jnp.shape(timesteps)[0] not in (1, b)
    ):
        raise ValueError(f"timesteps must be a scalar or [B={b}], got shape {jnp.shape(timesteps)}")
    if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
        raise ValueError(
            f"context must be [B={b}, Lt, text_dim={cfg.text_dim}], got shape {context.shape}"
        )
    return b, f, h, w, c


def init_params(config: WanConfig, rng: Array, latent_shape: tuple[int, ...] | None = None):
    """Fresh parameters as a plain pytree (logical-axis boxes removed).

    latent_shape: (B, F, H, W) of the dummy input used to trace the model (default: one patch);
    parameter shapes do not depend on it.
    """
    latents, timesteps, context = _dummy_inputs(config, latent_shape)
    # Parameters never depend on the FP8 impl; "emulated" initialises on any backend.
    variables = WanModel(config, linear_impl="emulated").init(rng, latents, timesteps, context)
    return nn.meta.unbox(variables["params"])


def param_logical_axes(config: WanConfig, quantized: bool = False):
    """The logical axis names of every parameter, a pytree of `jax.sharding.PartitionSpec`.

    quantized: the tree of `quantize_linear_weights` (each block linear's `kernel_scale` [layers,
    N] named like its kernel's output axis), so FP8 weights shard like the float ones.
    """
    latents, timesteps, context = _dummy_inputs(config, None)
    model = WanModel(config, linear_impl="emulated")
    abstract = jax.eval_shape(model.init, jax.random.key(0), latents, timesteps, context)
    specs = nn.get_partition_spec(abstract["params"])
    return quantized_logical_axes(specs) if quantized else specs


def _check_linear_params(cfg: WanConfig, params: Any) -> None:
    if cfg.linear_quant != "fp8" and is_quantized(params):
        raise ValueError(
            "params hold FP8 block linears (kernel_scale leaves, from quantize_linear_weights or "
            "`python -m fpsa_jax.convert --linear_quant fp8`) but config.linear_quant is "
            f"{cfg.linear_quant!r}; use the config they were quantized for (linear_quant='fp8')"
        )


def _dummy_inputs(config: WanConfig, latent_shape: tuple[int, ...] | None):
    b, f, h, w = (1, *config.patch_size) if latent_shape is None else latent_shape
    latents = jnp.zeros((b, f, h, w, config.in_dim), _F32)
    return latents, jnp.zeros((b,), _F32), jnp.zeros((b, 1, config.text_dim), _F32)
