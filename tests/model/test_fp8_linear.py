"""FP8 linears (fpsa_jax.model.fp8_linear) against a float64 NumPy reference, and in the DiT.

The reference rounds with ml_dtypes' float8_e4m3fn cast (an implementation independent of
`e4m3_round`) and computes the scales and quotients in float32, as the spec does (float32 scales),
so the quantized values must agree exactly; the matmul and the scaling are float64. What remains
is the float32 summation of exact E4M3 products over K terms plus a few roundings of the scaling:
a relative error of order K * 2^-24 of the largest term, so rtol/atol 1e-5 of the output's scale
for K < 100 leave a margin of 10x.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fpsa_jax.model.fp8_linear import (
    FP8,
    Fp8Dense,
    check_backend,
    fp8_matmul,
    quantize_linear_weights,
    quantize_tokens,
    quantize_weight,
)
from fpsa_jax.model.wan import WanModel, init_params, param_logical_axes
from tests.conftest import TINY_WAN

E4M3 = ml_dtypes.float8_e4m3fn


def _np_quantize(x, axis, scales=None):
    """float32 scales absmax / 448 (1 where all zero; or the given ones) and E4M3 values, by
    NumPy + ml_dtypes."""
    x = np.asarray(x, np.float32)
    if scales is None:
        amax = np.abs(x).max(axis=axis, keepdims=True)
        scales = np.where(amax > 0, amax / np.float32(448), np.float32(1)).astype(np.float32)
    scales = np.asarray(scales, np.float32)
    values = (x / scales).astype(E4M3).astype(np.float64)
    return values, scales.astype(np.float64)


def _np_fp8_dense(x, w, b):
    qx, sx = _np_quantize(x, -1)
    qw, sw = _np_quantize(w, -2)
    return (qx @ qw) * sx * sw + b


def _operands(m=(3, 7), k=37, n=29, seed=0):
    """Odd sizes, rows and columns of very different magnitudes, one all-zero row and column."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*m, k)) * np.exp(2 * rng.standard_normal((*m, 1)))
    w = rng.standard_normal((k, n)) * np.exp(rng.standard_normal((1, n)))
    x[0, 1] = 0.0
    w[:, 3] = 0.0
    b = rng.standard_normal(n)
    return x.astype(np.float32), w.astype(np.float32), b.astype(np.float32)


def _assert_close(got, want):
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5 * scale)


def test_quantized_values_and_scales_equal_the_numpy_reference():
    # Scales to one float32 ulp (XLA may divide by 448 as a multiplication by 1/448), the values
    # for those scales exactly.
    x, w, _ = _operands()
    for q, data, axis, shape in (
        (quantize_weight(jnp.asarray(w)), w, -2, (1, w.shape[1])),
        (quantize_tokens(jnp.asarray(x), "emulated"), x, -1, (*x.shape[:-1], 1)),
    ):
        assert q.scales.shape == shape and q.scales.dtype == jnp.float32
        _, scales = _np_quantize(data, axis)
        np.testing.assert_allclose(np.asarray(q.scales, np.float64), scales, rtol=2**-23)
        values, _ = _np_quantize(data, axis, q.scales)
        np.testing.assert_array_equal(np.asarray(q.values, np.float64), values)
    assert quantize_weight(jnp.asarray(w)).values.dtype == FP8
    assert quantize_tokens(jnp.asarray(x), "emulated").values.dtype == jnp.float32
    assert quantize_tokens(jnp.asarray(x), "emulated").scales[0, 1, 0] == 1.0  # all-zero token


@pytest.mark.parametrize("seed", [0, 1])
def test_emulated_fp8_dense_equals_the_float64_reference(seed):
    x, w, b = _operands(seed=seed)
    module = Fp8Dense(w.shape[1], ("embed", "mlp"), jnp.float32, jnp.float32, "emulated")
    y = module.apply({"params": {"kernel": w, "bias": b}}, x)
    assert y.shape == (3, 7, 29) and y.dtype == jnp.float32
    _assert_close(y, _np_fp8_dense(x, w, b))
    # A kernel quantized once (at load) computes the same.
    qw = quantize_weight(jnp.asarray(w))
    params = {"kernel": qw.values, "kernel_scale": qw.scales[0], "bias": b}
    np.testing.assert_array_equal(module.apply({"params": params}, x), y)


def test_fp8_is_not_the_float_matmul():
    x, w, b = _operands()
    module = Fp8Dense(w.shape[1], ("embed", "mlp"), jnp.float32, jnp.float32, "emulated")
    y = np.asarray(module.apply({"params": {"kernel": w, "bias": b}}, x), np.float64)
    exact = x.astype(np.float64) @ w + b
    rel = np.linalg.norm(y - exact) / np.linalg.norm(exact)
    assert 1e-3 < rel < 0.1  # E4M3 keeps 3 mantissa bits: ~2-4% per operand, partly averaged


def test_straight_through_gradients_are_those_of_the_dequantized_matmul():
    x, w, b = _operands(m=(5,), k=21, n=11, seed=3)
    g = np.random.default_rng(4).standard_normal((5, 11)).astype(np.float32)
    module = Fp8Dense(11, ("embed", "mlp"), jnp.float32, jnp.float32, "emulated")

    def loss(x, w):
        return jnp.sum(module.apply({"params": {"kernel": w, "bias": b}}, x) * g)

    dx, dw = jax.grad(loss, argnums=(0, 1))(x, w)
    qx, sx = _np_quantize(x, -1)
    qw, sw = _np_quantize(w, -2)
    # y = x_hat @ w_hat + b with the identity through the rounding: dL/dx = g w_hat^T, dL/dw =
    # x_hat^T g. The backward dots see bfloat16 operands (the forward's dtype), hence 2^-8.
    for got, want in ((dx, g @ (qw * sw).T), (dw, (qx * sx).T @ g)):
        np.testing.assert_allclose(got, want, rtol=0, atol=2**-8 * np.abs(want).max() * 4)


def test_cublaslt_refuses_a_backend_without_fp8_tensor_cores():
    with pytest.raises(ValueError, match=r"FP8 tensor cores .* the backend is cpu"):
        check_backend("cublaslt")
    check_backend("emulated")  # runs anywhere
    with pytest.raises(ValueError, match=r"unknown FP8 linear impl 'fast'.*cublaslt.*emulated"):
        check_backend("fast")
    x, w, _ = _operands()
    q = quantize_weight(jnp.asarray(w))
    with pytest.raises(ValueError, match="the backend is cpu"):
        fp8_matmul(quantize_tokens(jnp.asarray(x), "cublaslt"), q, "cublaslt")


# -- in the DiT ------------------------------------------------------------------------------

CFG = TINY_WAN
CFG8 = CFG.replace(linear_quant="fp8")


def _random_params(cfg, seed=0):
    params = init_params(cfg, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(tree, noisy)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((2, 3, 4, 6, 4)).astype(np.float32),
        np.array([100.0, 900.0], np.float32),
        rng.standard_normal((2, 5, 16)).astype(np.float32),
    )


def test_fp8_dit_is_close_to_the_float_dit_and_quantizing_at_load_changes_no_bit():
    params = _random_params(CFG)
    args = _inputs()
    ref = np.asarray(WanModel(CFG).apply({"params": params}, *args), np.float64)
    model = WanModel(CFG8, linear_impl="emulated")
    on_the_fly = model.apply({"params": params}, *args)
    quantized = quantize_linear_weights(params)
    at_load = model.apply({"params": quantized}, *args)
    np.testing.assert_array_equal(at_load, on_the_fly)
    rel = np.linalg.norm(np.asarray(at_load, np.float64) - ref) / np.linalg.norm(ref)
    assert 1e-3 < rel < 0.1, rel


def test_quantized_tree_halves_the_block_linears_and_has_matching_logical_axes():
    params = init_params(CFG, jax.random.key(0), (1, 1, 2, 2))
    quantized = quantize_linear_weights(params)
    ffn = quantized["blocks"]["ffn"]["fc1"]
    assert ffn["kernel"].dtype == FP8 and ffn["kernel"].shape == (2, 24, 32)
    assert ffn["kernel_scale"].dtype == jnp.float32 and ffn["kernel_scale"].shape == (2, 32)
    assert quantized["head"] is params["head"]  # everything else untouched
    specs = param_logical_axes(CFG8, quantized=True)
    is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)  # noqa: E731
    paths = lambda tree, **kw: {p for p, _ in jax.tree_util.tree_leaves_with_path(tree, **kw)}  # noqa: E731
    assert paths(specs, is_leaf=is_spec) == paths(quantized)
    assert tuple(specs["blocks"]["ffn"]["fc1"]["kernel_scale"]) == ("layers", "mlp")
    assert tuple(specs["blocks"]["self_attn"]["o"]["kernel_scale"]) == ("layers", "embed")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_linear_weights(quantized)


def test_fp8_params_under_a_config_without_fp8_linears_are_refused():
    quantized = quantize_linear_weights(_random_params(CFG))
    with pytest.raises(ValueError, match="hold FP8 block linears .*config.linear_quant is 'none'"):
        WanModel(CFG).apply({"params": quantized}, *_inputs())


def test_fp8_dit_with_the_default_impl_names_the_backend_on_cpu():
    with pytest.raises(ValueError, match="the backend is cpu"):
        WanModel(CFG8).apply({"params": _random_params(CFG)}, *_inputs())
