"""Per-head error metrics of an attention output against dense references (schedule calibration).

Each metric reduces over batch, tokens and channels and keeps heads: arrays of shape [N].
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax.attention.xla import dense_attention


@dataclasses.dataclass(frozen=True)
class AttentionErrors:
    """Errors of an output against a reference, per head. All float64 NumPy [N].

    Attributes:
      rel_l2: ||o - ref|| / ||ref||.
      cosine: <o, ref> / (||o|| ||ref||).
      snr_db: 10 log10(||ref||^2 / ||o - ref||^2); inf where the two are equal.
    """

    rel_l2: np.ndarray
    cosine: np.ndarray
    snr_db: np.ndarray


def error_sums(out, ref) -> jax.Array:
    """The sums behind the errors, per head: float32 [4, N] = (||o - ref||^2, ||ref||^2, ||o||^2,
    <o, ref>) over batch, tokens and channels of `out` and `ref` [B, L, N, D]. Jittable, so a
    traced computation can reduce an output to these on the device; sums of several outputs add,
    and `errors_from_sums` turns them into errors."""
    o, r = jnp.asarray(out, jnp.float32), jnp.asarray(ref, jnp.float32)
    if o.shape != r.shape or o.ndim != 4:
        raise ValueError(f"out and ref must both be [B, L, N, D], got {o.shape} and {r.shape}")
    axes = (0, 1, 3)
    return jnp.stack(
        [
            jnp.sum(jnp.square(o - r), axis=axes),
            jnp.sum(jnp.square(r), axis=axes),
            jnp.sum(jnp.square(o), axis=axes),
            jnp.sum(o * r, axis=axes),
        ]
    )


def errors_from_sums(sums) -> AttentionErrors:
    """`AttentionErrors` from sums [4, ...] laid out as `error_sums` returns them (any trailing
    shape: [4, N] per head, or summed over heads first for one error of the whole output)."""
    err2, ref2, out2, dot = np.asarray(sums, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return AttentionErrors(
            rel_l2=np.sqrt(err2 / ref2),
            cosine=dot / np.sqrt(out2 * ref2),
            snr_db=10.0 * np.log10(ref2 / err2),
        )


def compare(out, ref) -> AttentionErrors:
    """Errors of `out` against `ref`, both [B, L, N, D], computed in float64 on the host."""
    o = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    r = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    if o.shape != r.shape or o.ndim != 4:
        raise ValueError(f"out and ref must both be [B, L, N, D], got {o.shape} and {r.shape}")
    axes = (0, 1, 3)
    sums = [((o - r) ** 2).sum(axes), (r**2).sum(axes), (o**2).sum(axes), (o * r).sum(axes)]
    return errors_from_sums(sums)


def dense_reference_f64(q, k, v, *, scale: float | None = None, chunk: int = 1024) -> np.ndarray:
    """Dense softmax attention in float64 NumPy, queries in chunks. [B, L, N, D] -> float64."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out = np.empty_like(q)
    for start in range(0, q.shape[1], chunk):
        s = np.einsum("bqnd,bknd->bnqk", q[:, start : start + chunk], k) * scale
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        out[:, start : start + chunk] = np.einsum("bnqk,bknd->bqnd", p, v)
    return out


def dense_reference_bf16(q, k, v, *, scale: float | None = None) -> jax.Array:
    """Dense attention as a bf16 model runs it: bf16 inputs, float32 softmax and accumulation."""
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return dense_attention(q, k, v, scale=scale)


def error_report(out, q, k, v, *, scale: float | None = None) -> dict[str, AttentionErrors]:
    """Errors of `out` against dense bf16 ("bf16") and float64 ("f64") attention of q, k, v."""
    return {
        "bf16": compare(out, dense_reference_bf16(q, k, v, scale=scale)),
        "f64": compare(out, dense_reference_f64(q, k, v, scale=scale)),
    }
