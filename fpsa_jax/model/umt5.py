"""The UMT5 text encoder of Wan2.1 (umt5-xxl) in Flax linen, with its tokenizer front end.

Computes what Wan's `wan/modules/t5.py` encoder and transformers' `UMT5EncoderModel` compute:
token embedding, then per layer a pre-norm self-attention with a relative position bias of its
own (UMT5; T5 shares one bias across layers) and no 1/sqrt(D) score scaling, a pre-norm gated
GELU(tanh) feed-forward, and a final RMSNorm. Shapes: B batch, L text tokens, N heads, D head dim,
E model dim (d_model), F feed-forward dim.

Matmuls and attention run in `config.dtype`; norms compute their variance in float32 and the
softmax runs in float32. The residual stream stays in `config.dtype`, as in the bf16 original.
The relative-position bucket table is host NumPy (`relative_position_buckets`), a constant of
the traced program.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax.json_config import JsonConfig

Array = jax.Array
_F32 = jnp.float32
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class UMT5Config(JsonConfig):
    """Hyper-parameters of a UMT5 encoder.

    `d_kv` is the head dim D (num_heads * d_kv need not equal d_model); `dtype` is the compute
    dtype, `param_dtype` the dtype of freshly initialised parameters; `text_len` the tokenizer's
    maximum length (EOS included).
    """

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_heads: int
    num_layers: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512
    dtype: str = "bfloat16"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in (
            "vocab_size",
            "d_model",
            "d_kv",
            "d_ff",
            "num_heads",
            "num_layers",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
            "text_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"UMT5Config.{name} must be a positive int, got {value!r}")
        if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 2:
            raise ValueError(
                "UMT5Config.relative_attention_num_buckets must be even and >= 4 "
                f"(half per direction), got {self.relative_attention_num_buckets}"
            )
        exact = self.relative_attention_num_buckets // 4
        if self.relative_attention_max_distance <= exact:
            raise ValueError(
                f"UMT5Config.relative_attention_max_distance must exceed the exact range "
                f"num_buckets // 4 = {exact}, got {self.relative_attention_max_distance}"
            )
        if not (isinstance(self.eps, int | float) and self.eps > 0):
            raise ValueError(f"UMT5Config.eps must be > 0, got {self.eps!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(
                    f"UMT5Config.{name} must be one of {_DTYPES}, got {getattr(self, name)!r}"
                )

    @property
    def inner_dim(self) -> int:
        """N * D, the width of q, k and v."""
        return self.num_heads * self.d_kv

    def num_params(self) -> int:
        """Parameter count of the encoder (embedding included)."""
        e = self.d_model
        block = (
            4 * e * self.inner_dim
            + 3 * e * self.d_ff
            + 2 * e
            + self.relative_attention_num_buckets * self.num_heads
        )
        return self.vocab_size * e + self.num_layers * block + e

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> UMT5Config:
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown UMT5Config preset {name!r}; valid: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[key], **overrides)

    def replace(self, **changes: Any) -> UMT5Config:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, UMT5Config] = {
    "umt5-xxl": UMT5Config(
        vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=24
    ),
    # Same code path at toy size for CPU tests.
    "tiny": UMT5Config(
        vocab_size=128,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_heads=4,
        num_layers=2,
        text_len=16,
        dtype="float32",
    ),
}


def relative_position_buckets(
    q_len: int, k_len: int, num_buckets: int, max_distance: int
) -> np.ndarray:
    """The bidirectional T5 bucket of each (query i, key j) pair: int32 [q_len, k_len].

    Relative position r = j - i. Half the buckets serve r > 0 (offset num_buckets // 2), half
    r <= 0; within a half, |r| below a quarter of num_buckets gets its own bucket, larger |r|
    share logarithmically wider buckets up to max_distance, beyond which all share the last.
    Computed in float32 like the PyTorch originals, so the table matches theirs bit for bit.
    """
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    half = num_buckets // 2
    exact = half // 2
    dist = np.abs(rel)
    with np.errstate(divide="ignore"):  # log(0) where dist == 0 is discarded by the where
        log_ratio = (
            np.log(dist.astype(np.float32) / np.float32(exact))
            / np.float32(math.log(max_distance / exact))
            * np.float32(half - exact)
        )
    large = np.minimum(exact + np.where(dist < exact, 0, log_ratio).astype(np.int64), half - 1)
    bucket = np.where(rel > 0, half, 0) + np.where(dist < exact, dist, large)
    return bucket.astype(np.int32)


def rms_norm_scale(x: Array, scale: Array, eps: float, dtype: Any) -> Array:
    """T5 RMSNorm: x / sqrt(mean(x^2) + eps) with a float32 variance, cast to `dtype`, times the
    scale (no mean subtraction, no bias)."""
    x32 = x.astype(_F32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + eps)
    return normed.astype(dtype) * scale.astype(dtype)


class RMSNorm(nn.Module):
    """`rms_norm_scale` with a learned [E] scale; [B, L, E] -> [B, L, E] in `dtype`."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        return rms_norm_scale(x, scale, self.eps, self.dtype)


def _dense(
    features: int, axes: tuple[str, str], dtype: Any, param_dtype: Any, name: str
) -> nn.Dense:
    # float32 asks for full-precision dots (GPUs would otherwise use TF32).
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == _F32 else None
    return nn.Dense(
        features,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
        name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
    )


class SelfAttention(nn.Module):
    """Unscaled multi-head self-attention with an additive bias; keys with mask 0 are ignored."""

    config: UMT5Config

    @nn.compact
    def __call__(self, x: Array, bias: Array, key_mask: Array) -> Array:
        """x: [B, L, E]; bias: [N, L, L] float32; key_mask: [B, L] bool. Returns [B, L, E]."""
        cfg = self.config
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        b, n, d = x.shape[0], cfg.num_heads, cfg.d_kv
        q, k, v = (
            _dense(cfg.inner_dim, ("embed", "heads"), dt, pdt, name)(x).reshape(b, -1, n, d)
            for name in ("q", "k", "v")
        )
        precision = jax.lax.Precision.HIGHEST if dt == _F32 else None
        logits = (
            jnp.einsum("blnd,bknd->bnlk", q, k, preferred_element_type=_F32, precision=precision)
            + bias[None]
        )
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(_F32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(dt)
        out = jnp.einsum("bnlk,bknd->blnd", probs, v, precision=precision)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        return _dense(cfg.d_model, ("heads", "embed"), dt, pdt, "o")(out.reshape(b, -1, n * d))


class GatedFeedForward(nn.Module):
    """fc2(gelu_tanh(gate(x)) * fc1(x)): [B, L, E] -> [B, L, F] -> [B, L, E]."""

    config: UMT5Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        gate = _dense(cfg.d_ff, ("embed", "mlp"), dt, pdt, "gate")(x)
        y = nn.gelu(gate, approximate=True) * _dense(cfg.d_ff, ("embed", "mlp"), dt, pdt, "fc1")(x)
        y = nn.with_logical_constraint(y, ("batch", "length", "mlp"))
        return _dense(cfg.d_model, ("mlp", "embed"), dt, pdt, "fc2")(y)


class UMT5Block(nn.Module):
    """x + attn(norm1(x), own relative bias), then x + ffn(norm2(x))."""

    config: UMT5Config

    @nn.compact
    def __call__(self, x: Array, buckets: Array, key_mask: Array) -> tuple[Array, None]:
        """x: [B, L, E] in config.dtype; buckets: int32 [L, L]; key_mask: [B, L] bool."""
        cfg = self.config
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        table = self.param(
            "pos_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None)),
            (cfg.relative_attention_num_buckets, cfg.num_heads),
            pdt,
        )
        bias = jnp.einsum("lkn->nlk", table.astype(_F32)[buckets])  # [N, L, L]
        h = RMSNorm(cfg.eps, dt, pdt, name="norm1")(x)
        x = x + SelfAttention(cfg, name="attn")(h, bias, key_mask).astype(dt)
        h = RMSNorm(cfg.eps, dt, pdt, name="norm2")(x)
        x = x + GatedFeedForward(cfg, name="ffn")(h).astype(dt)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class UMT5Encoder(nn.Module):
    """The UMT5 encoder: __call__(ids int [B, L], mask [B, L] (1 = token, 0 = padding)) ->
    [B, L, E] in config.dtype. Rows at padded positions are computed but meaningless."""

    config: UMT5Config

    @nn.compact
    def __call__(self, ids: Array, mask: Array) -> Array:
        cfg = self.config
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"ids and mask must both be [B, L], got {ids.shape} and {mask.shape}")
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=dt,
            param_dtype=pdt,
            name="token_embedding",
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(1.0), ("vocab", "embed")
            ),
        )
        x = nn.with_logical_constraint(embed(ids), ("batch", "length", "embed"))
        length = ids.shape[1]
        buckets = jnp.asarray(
            relative_position_buckets(
                length,
                length,
                cfg.relative_attention_num_buckets,
                cfg.relative_attention_max_distance,
            )
        )
        blocks = nn.scan(
            UMT5Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="blocks")
        x = blocks(x, buckets, mask.astype(bool))[0]
        return RMSNorm(cfg.eps, dt, pdt, name="norm")(x)


def init_params(config: UMT5Config, rng: Array) -> dict[str, Any]:
    """Fresh parameters as a plain pytree (logical-axis boxes removed)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    variables = jax.jit(UMT5Encoder(config).init)(rng, ids, jnp.ones_like(ids))
    return nn.meta.unbox(variables["params"])


@functools.partial(jax.jit, static_argnames=("config",))
def _encode(params: Any, ids: Array, mask: Array, config: UMT5Config) -> Array:
    out = UMT5Encoder(config).apply({"params": params}, ids, mask)
    lengths = jnp.sum(mask != 0, axis=1)
    keep = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
    return jnp.where(keep[..., None], out, jnp.zeros((), out.dtype))


def encode_text(
    params: Any, config: UMT5Config, ids: Any, mask: Any, pad_to: int | None = None
) -> list[Array] | Array:
    """Encodes token ids as Wan does: each row cut to its true length (the number of 1s in its
    mask, which is a prefix of 1s for tokenizer output).

    Args:
      ids, mask: int [B, L] from `Tokenizer`.
      pad_to: None returns a list of B arrays [len_b, E] (Wan's `T5EncoderModel` output);
        an int returns one [B, pad_to, E] array, zero beyond each row's length and cut at
        pad_to (what the DiT does with the list, text_len = 512).
    """
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    out = _encode(params, ids, mask, config)
    if pad_to is None:
        lengths = np.asarray(jnp.sum(mask != 0, axis=1))
        return [out[i, : int(n)] for i, n in enumerate(lengths)]
    if out.shape[1] >= pad_to:
        return out[:, :pad_to]
    return jnp.pad(out, ((0, 0), (0, pad_to - out.shape[1]), (0, 0)))


# -- tokenizer ---------------------------------------------------------------------------------


def clean_text(text: str) -> str:
    """Wan's prompt cleaning: `ftfy.fix_text`, HTML-unescape twice, strip, then collapse runs of
    whitespace to one space.

    Without ftfy installed the ftfy step is skipped: mojibake ('â€™'), curly quotes, ligatures,
    full-width characters and control characters then stay as they are, so such prompts may
    tokenize differently from Wan. Plain well-formed text is unaffected.
    """
    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class Tokenizer:
    """The umt5-xxl tokenizer as Wan uses it: cleaned text, EOS appended, truncated and padded to
    `max_length`; returns numpy int32 (ids [B, L], mask [B, L]).

    path: a local directory holding the `google/umt5-xxl` tokenizer files; its `tokenizer.json`
    (which the Wan2.1 and diffusers repos ship beside spiece.model) is read with the `tokenizers`
    package, the pad and EOS tokens named by its tokenizer_config.json or special_tokens_map.json
    (default `<pad>`, `</s>`). Computes what transformers' T5TokenizerFast computes with
    padding="max_length", truncation=True; nothing is downloaded.
    """

    def __init__(self, path: str | Path, max_length: int = 512):
        path = Path(path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"tokenizer directory not found: {path} (expected the "
                "google/umt5-xxl tokenizer files)"
            )
        if not (path / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(
                f"tokenizer directory {path} has no {TOKENIZER_FILE} (the google/umt5-xxl "
                f"tokenizer as the Wan2.1 and diffusers repos ship it); found "
                f"{sorted(p.name for p in path.iterdir()) or 'nothing'}"
            )
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError(
                "fpsa_jax.model.umt5.Tokenizer needs the `tokenizers` package, a dependency of "
                "fpsa-jax (pip install tokenizers); the encoder itself does not"
            ) from e
        self.max_length = max_length
        self._tokenizer = tokenizers.Tokenizer.from_file(str(path / TOKENIZER_FILE))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        names = _special_tokens(path)
        self.pad_id, self.eos_id = (self._token_id(names[k], path) for k in ("pad", "eos"))
        try:
            import ftfy  # noqa: F401
        except ImportError:
            warnings.warn(
                "ftfy is not installed: prompts are cleaned without ftfy.fix_text, "
                "see fpsa_jax.model.umt5.clean_text",
                stacklevel=2,
            )

    def _token_id(self, token: str, path: Path) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{path / TOKENIZER_FILE} has no token {token!r}")
        return int(token_id)

    def __call__(self, texts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """texts: one string or B strings -> (ids int32 [B, max_length], mask int32 [B, ...])."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        encoded = self._tokenizer.encode_batch(
            [clean_text(t) for t in texts], add_special_tokens=False
        )
        ids = np.full((len(texts), self.max_length), self.pad_id, np.int32)
        mask = np.zeros((len(texts), self.max_length), np.int32)
        for row, encoding in enumerate(encoded):
            tokens = [*encoding.ids[: self.max_length - 1], self.eos_id]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return ids, mask


TOKENIZER_FILE = "tokenizer.json"


def _special_tokens(path: Path) -> dict[str, str]:
    """{"pad": token, "eos": token} from the directory's tokenizer configs (T5's by default)."""
    found = {"pad": "<pad>", "eos": "</s>"}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            config = json.loads((path / name).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for key in found:
            value = config.get(f"{key}_token") if isinstance(config, dict) else None
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                found[key] = value
    return found
