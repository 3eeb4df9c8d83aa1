"""The attention's q/k RMSNorm with RoPE after it (`norms.rms_norm`), by XLA and by the Triton
pass (`pallas_kernels.triton_rms_rope`).

Reference: float64 NumPy, n = x / sqrt(mean(x^2) + eps) rounded to x's dtype (ml_dtypes), times
the weight, each head's channel pairs rotated by the float64 angles, rounded to the output dtype.
The implementations compute the statistics in float32 (relative error ~1e-6), so a normalised
value within ~1e-6 of a bfloat16 rounding midpoint may round the other way: one bfloat16 step
(at most 2^-7 of the value) in that intermediate, carried through the weight and the rotation. The
bounds below are that step on both channels of a pair plus the output's own half step, and at
least 99% of the values must equal the reference exactly.

CPU: the XLA writer, and the kernel under Triton's interpreter (float32 in and out, so the
intermediate rounding is the identity there); GPU (marker `gpu`): the kernel's bfloat16 output
and its gradient through jax-triton against the XLA writer, at Wan's widths.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fpsa_jax.model.embeddings import rope_tables
from fpsa_jax.model.fp8_linear import Fp8Dense
from fpsa_jax.model.norms import rms_norm
from fpsa_jax.model.pending_linear import PendingDense, PendingLinear
from tests.triton_interpreter import interpreted_results

EPS = 1e-6
BF16 = ml_dtypes.bfloat16


def _case(b, length, heads, head_dim, seed, dtype=BF16):
    """x [b, length, heads * head_dim] with rows of very different sizes, a zero row, a weight
    around 1; rope tables for a (T, H, W) grid of `length` tokens."""
    rng = np.random.default_rng(seed)
    dim = heads * head_dim
    x = rng.standard_normal((b, length, dim)) * np.exp(2 * rng.standard_normal((b, length, 1)))
    x[0, 1] = 0.0  # rsqrt(eps): zeros out
    scale = 1 + 0.3 * rng.standard_normal(dim)
    grid = (length, 1, 1)
    third = head_dim // 2 // 3 * 2  # channels per axis, even, summing to head_dim
    dims = (head_dim - 2 * third, third, third)
    return x.astype(dtype), scale.astype(np.float32), rope_tables(grid, dims)


def _reference(x, scale, rope, head_dim, round_dtype):
    """float64 (norm -> round to round_dtype -> weight -> rotation); also the per-value bound of
    one rounding step of the intermediate, carried through."""
    x = np.asarray(x, np.float64)
    n = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS)
    n = n.astype(round_dtype).astype(np.float64)
    y = n * scale
    # one bfloat16 step is at most 2^-7 of the value (8 significant bits)
    step = 2.0**-7 * np.abs(y) if round_dtype == BF16 else 1e-6 * np.abs(y)
    if rope is None:
        return y, step
    b, length, dim = x.shape
    pairs = y.reshape(b, length, dim // head_dim, head_dim // 2, 2)
    cos, sin = (np.asarray(t, np.float64)[None, :, None, :] for t in rope)
    re, im = pairs[..., 0], pairs[..., 1]
    out = np.stack([re * cos - im * sin, re * sin + im * cos], -1).reshape(x.shape)
    s = step.reshape(pairs.shape)
    both = (s[..., 0] + s[..., 1])[..., None]  # a rotation mixes the pair's two errors
    return out, np.broadcast_to(both, pairs.shape).reshape(x.shape)


def _assert_close(got, want, step, out_dtype, min_exact=0.99):
    got = np.asarray(got, np.float64)
    half = 2.0**-8 if out_dtype == BF16 else 2.0**-23  # half a step, relative, at most
    bound = step + half * np.abs(want) + 1e-30
    assert np.all(np.abs(got - want) <= bound * (1 + 1e-3)), np.max(np.abs(got - want) / bound)
    rounded = want.astype(out_dtype).astype(np.float64)
    assert np.mean(got == rounded) >= min_exact


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norm_only"])
def test_xla_rms_norm_matches_float64_norm_weight_and_rotation(rope):
    # 3 heads of 20: the three RoPE axes take 8 / 6 / 6 channels, L = 37 tokens.
    x, scale, tables = _case(2, 37, 3, 20, seed=0)
    tables = tables if rope else None
    got = rms_norm(jnp.asarray(x), jnp.asarray(scale), EPS, tables, head_dim=20, out_dtype=BF16)
    assert got.dtype == jnp.bfloat16 and got.shape == x.shape
    want, step = _reference(x, scale, tables, 20, BF16)
    _assert_close(got.astype(jnp.float32), want, step, BF16)
    assert not np.any(np.asarray(got[0, 1], np.float32))  # the zero row


def test_rms_norm_defaults_to_float32_out_and_checks_its_rope_input():
    x, scale, tables = _case(1, 6, 2, 8, seed=1)
    assert rms_norm(jnp.asarray(x), jnp.asarray(scale), EPS).dtype == jnp.float32
    with pytest.raises(ValueError, match="needs x \\[B, L, DIM\\] and head_dim"):
        rms_norm(jnp.asarray(x), jnp.asarray(scale), EPS, tables)


def test_bad_writer_and_unavailable_triton_writer_are_refused():
    x, scale, _ = _case(1, 4, 2, 8, seed=2)
    with pytest.raises(ValueError, match="unknown RMSNorm writer 'cuda'"):
        rms_norm(jnp.asarray(x), jnp.asarray(scale), EPS, writer="cuda")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="RMSNorm writer 'triton' cannot run: the backend"):
            rms_norm(jnp.asarray(x), jnp.asarray(scale), EPS, writer="triton")


def test_kernel_call_rejects_tables_of_the_wrong_shape():
    from pallas_kernels import triton_rms_rope

    x, scale, (cos, sin) = _case(1, 6, 2, 8, seed=3)
    with pytest.raises(ValueError, match="RoPE tables must be \\[6, 4\\]"):
        triton_rms_rope.rms_norm_rope(
            jnp.asarray(x), jnp.asarray(scale), EPS, cos[:5], sin[:5], head_dim=8
        )
    with pytest.raises(ValueError, match="do not split into heads of 6"):
        triton_rms_rope.kernel_meta(4, 16, head_dim=6, eps=EPS, rope=True)


# -- the Triton kernel under the interpreter -------------------------------------------------


def _interpreted_cases():
    """(name, x float32 [B, L, DIM], scale, tables or None, head_dim): 5 heads of 44 (DIM 220,
    walked in 64-wide steps, the last one partial), and the norm alone on 300 channels."""
    x, scale, tables = _case(2, 13, 5, 44, seed=4, dtype=np.float32)
    y, scale2, _ = _case(3, 7, 3, 100, seed=5, dtype=np.float32)
    return [("rope", x, scale, tables, 44), ("norm_only", y, scale2, None, 100)]


def _affine_operands(rows, dim, seed):
    """An FP8 linear's epilogue operands: bias [dim], row scales [rows], column scales [dim]."""
    rng = np.random.default_rng(seed)
    bias = rng.standard_normal(dim).astype(np.float32)
    row_scale = np.exp(rng.standard_normal(rows) - 2).astype(np.float32)
    col_scale = np.exp(rng.standard_normal(dim) - 2).astype(np.float32)
    return bias, row_scale, col_scale


def run_interpreted(path: str) -> None:
    """Runs the kernel under Triton's interpreter (TRITON_INTERPRET=1) on every case; saves the
    outputs to `path` (.npz). Called in a subprocess by the fixture below."""
    import torch

    from pallas_kernels import triton_rms_rope as rr

    results = {}
    for name, x, scale, tables, head_dim in _interpreted_cases():
        b, length, dim = x.shape
        rope = tables is not None
        call = rr.kernel_meta(
            b * length, dim, length=length, head_dim=head_dim, eps=EPS, rope=rope, chunk=64
        )
        cos, sin = tables if rope else (np.zeros(1, np.float32),) * 2
        out = torch.full((b * length, dim), float("nan"))
        args = [x.reshape(b * length, dim), scale, cos, sin]
        tensors = [torch.from_numpy(np.ascontiguousarray(a, np.float32)) for a in args]
        unused = [np.zeros(1, np.float32)] * 3
        tensors = [tensors[0], *(torch.from_numpy(u) for u in unused), *tensors[1:]]
        rr.kernel()[call["grid"]](*tensors, out, **call["meta"])
        results[name] = out.numpy().reshape(x.shape)
        if rope:  # the same rows as an FP8 linear's sums with its scales and bias (AFFINE 2)
            affine = _affine_operands(b * length, dim, seed=9)
            call["meta"]["AFFINE"] = 2
            out = torch.full((b * length, dim), float("nan"))
            tensors[1:4] = [torch.from_numpy(a) for a in affine]
            rr.kernel()[call["grid"]](*tensors, out, **call["meta"])
            results["affine"] = out.numpy().reshape(x.shape)
    np.savez(path, **results)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rms_rope")
    return interpreted_results("tests.model.test_rms_norm_rope", "run_interpreted", tmp)


@pytest.mark.parametrize("i", range(2), ids=["rope", "norm_only"])
def test_interpreted_kernel_writes_the_normed_rotated_rows(i, interpreted):
    name, x, scale, tables, head_dim = _interpreted_cases()[i]
    got = interpreted[name]
    assert not np.isnan(got).any()  # every value written
    want, step = _reference(x, scale, tables, head_dim, np.float32)
    _assert_close(got, want, step, np.float32, min_exact=0.0)


def test_interpreted_kernel_applies_the_fp8_linears_epilogue_first(interpreted):
    _, x, scale, tables, head_dim = _interpreted_cases()[0]
    bias, row_scale, col_scale = _affine_operands(x.shape[0] * x.shape[1], x.shape[2], seed=9)
    linear = x.astype(np.float64) * row_scale.reshape(x.shape[:2] + (1,)) * col_scale + bias
    want, step = _reference(linear, scale, tables, head_dim, np.float32)
    _assert_close(interpreted["affine"], want, 4 * step, np.float32, min_exact=0.0)


def test_pending_linears_finish_exactly_as_the_linears_would():
    rng = np.random.default_rng(10)
    x = jnp.asarray(rng.standard_normal((2, 9, 24)), jnp.bfloat16)
    dense = nn.Dense(16, dtype=jnp.bfloat16)
    params = dense.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias
    pending = PendingDense(16, dtype=jnp.bfloat16).apply(params, x)
    np.testing.assert_array_equal(
        np.asarray(pending.value(), np.float32), np.asarray(dense.apply(params, x), np.float32)
    )
    fp8 = lambda e: Fp8Dense(16, (None, None), jnp.bfloat16, jnp.float32, "emulated", epilogue=e)  # noqa: E731
    fp8_params = fp8("linear").init(jax.random.key(1), x)
    fp8_params = jax.tree.map(lambda p: p + 0.1, fp8_params)
    got = fp8("pending").apply(fp8_params, x)
    assert isinstance(got, PendingLinear)
    np.testing.assert_array_equal(
        np.asarray(got.value(), np.float32),
        np.asarray(fp8("linear").apply(fp8_params, x), np.float32),
    )


# -- the real kernel on a GPU ----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "b,length,heads,rope",
    [(2, 1031, 12, True), (1, 333, 40, True), (2, 517, 40, False)],
    ids=["1.3b_width", "14b_width", "14b_norm_only"],
)
def test_gpu_kernel_equals_the_xla_writer_and_its_gradient(b, length, heads, rope):
    x, scale, tables = _case(b, length, heads, 128, seed=6)
    tables = tables if rope else None
    xs, ss = jnp.asarray(x), jnp.asarray(scale)

    def run(writer):
        f = lambda x, s: rms_norm(x, s, EPS, tables, head_dim=128, out_dtype=BF16, writer=writer)  # noqa: E731
        return jax.jit(f)(xs, ss), jax.jit(jax.grad(lambda x, s: jnp.sum(f(x, s) ** 2), (0, 1)))(
            xs, ss
        )

    (got, grad_t), (ref, grad_x) = run("triton"), run("xla")
    want, step = _reference(x, scale, tables, 128, BF16)
    _assert_close(got.astype(jnp.float32), want, step, BF16)
    # XLA on a GPU may skip the intermediate rounding to bfloat16 inside its fusion (excess
    # precision, measured: ~28% of values differ by that step), so its output is held to the
    # bound only, not to exact agreement.
    _assert_close(ref.astype(jnp.float32), want, step, BF16, min_exact=0.0)
    # The backward is the definition's VJP at the same inputs; the cotangents differ only by
    # the two forwards' rounding (one bfloat16 step of some values).
    for gt, gx in zip(grad_t, grad_x, strict=True):
        gt, gx = np.asarray(gt, np.float32), np.asarray(gx, np.float32)
        np.testing.assert_allclose(gt, gx, rtol=0.05, atol=0.05 * np.abs(gx).max())


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bias", "fp8_scales"])
def test_gpu_kernel_finishes_a_pending_linear_on_the_way_in(fp8):
    b, length, heads = 2, 701, 40
    x, scale, tables = _case(b, length, heads, 128, seed=11)
    bias, row_scale, col_scale = _affine_operands(b * length, heads * 128, seed=12)
    acc = jnp.asarray(x)  # bfloat16 GEMM sums
    if fp8:
        rs, cs = row_scale.reshape(b, length, 1), col_scale.reshape(1, -1)
        pending = PendingLinear(acc, jnp.asarray(bias), jnp.asarray(rs), jnp.asarray(cs), BF16)
        linear = np.asarray(x, np.float64) * rs * cs + bias
    else:
        pending = PendingLinear(acc, jnp.asarray(bias, jnp.bfloat16), dtype=BF16)
        linear = np.asarray(x, np.float64) + np.asarray(bias.astype(BF16), np.float64)
    linear = linear.astype(BF16)  # the linear's output dtype
    f = lambda p: rms_norm(p, jnp.asarray(scale), EPS, tables, head_dim=128, out_dtype=BF16)  # noqa: E731
    got = jax.jit(f)(pending)
    want, step = _reference(linear, scale, tables, 128, BF16)
    # the linear's own bfloat16 rounding may also flip at a midpoint: two steps
    _assert_close(got.astype(jnp.float32), want, 2 * step, BF16, min_exact=0.98)
