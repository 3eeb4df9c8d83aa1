"""The FP8 linears' fused input quantization: `quantize_normed_tokens` (LayerNorm + modulation, or
an affine LayerNorm) and `quantize_gelu_tokens` (fc1's GEMM sums -> fc2's input), by XLA and by
the Triton row kernel (`pallas_kernels.triton_row_quant`).

Reference: float64 NumPy for the producer (LayerNorm, GELU tanh), the absmax scale, and ml_dtypes'
E4M3 cast of the float64 quotient. The implementations compute the producer in float32 (relative
error ~1e-6), so a quotient within ~1e-6 of an E4M3 rounding midpoint may round the other way: the
tests bound every dequantized value by E4M3's half step (2^-4 of the value, or 2^-10 of the scale
for subnormals) plus that float32 slack, and ask for at least 99.5% of the values to be exactly
NumPy's. Scales: rtol 1e-5 (float32 LayerNorm statistics over K <= 2000 terms).

CPU: the XLA writer, and the kernel under Triton's interpreter (TRITON_INTERPRET=1, torch CPU
tensors) writing float32 quotients (the interpreter's float32 -> fp8 cast is wrong); GPU (marker
`gpu`): the kernel's real E4M3 output through jax-triton against the XLA writer.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fpsa_jax.attention.quant import QuantizedTensor
from fpsa_jax.model.fp8_linear import (
    Fp8Dense,
    quantize_gelu_tokens,
    quantize_normed_tokens,
    quantize_tokens,
    triton_quantize_support,
)
from tests.triton_interpreter import interpreted_results

EPS = 1e-6
TANH_C = np.sqrt(2 / np.pi)


def _np_layernorm(x, mul, add):
    x = np.asarray(x, np.float64)
    with np.errstate(invalid="ignore"):  # a row holding inf becomes NaN, as in float32
        mean = x.mean(-1, keepdims=True)
        var = np.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + EPS) * mul + add


def _np_gelu_input(acc, row_scales, col_scales, bias):
    u = np.asarray(acc, np.float64) * row_scales * col_scales + bias
    with np.errstate(invalid="ignore"):  # GELU(-inf) = -inf * 0 = NaN, as in float32
        return 0.5 * u * (1 + np.tanh(TANH_C * (u + 0.044715 * u**3)))


def _np_scales(y):
    finite = np.where(np.isfinite(y), np.abs(y), 0.0)
    amax = finite.max(-1, keepdims=True)
    return np.where(amax > 0, amax / 448, 1.0)


def _assert_quantized_like(values, scales, y, min_exact=0.995):
    """values [..., K] (dequantizable E4M3 numbers), scales [..., 1] against y (float64)."""
    want_scales = _np_scales(y)
    np.testing.assert_allclose(np.asarray(scales, np.float64), want_scales, rtol=1e-5)
    got = np.asarray(values, np.float64)
    quotient = np.clip(y / want_scales, -448, 448)
    want = quotient.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    finite = np.isfinite(y)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(y))
    bound = np.maximum(2.0**-4 * np.abs(quotient), 2.0**-10) * (1 + 1e-5) + 1e-4
    assert np.all(np.abs(got - quotient)[finite] <= bound[finite])
    assert np.mean(got[finite] == want[finite]) >= min_exact


def _normed_case(b=2, length=37, k=300, seed=0):
    """Rows of very different magnitudes and offsets, a constant row (LayerNorm gives 0: an all-
    zero row once the shift is zero), per-batch modulation."""
    rng = np.random.default_rng(seed)
    # Offsets up to ~10 spreads: float32 centring then loses ~10 ulps, below the tolerances.
    spread = np.exp(2 * rng.standard_normal((b, length, 1)))
    x = rng.standard_normal((b, length, k)) * spread
    x += 3 * spread * rng.standard_normal((b, length, 1))
    x[0, 3] = 7.0
    mul = 1 + 0.5 * rng.standard_normal((b, 1, k))
    add = 0.2 * rng.standard_normal((b, 1, k))
    add[0] = 0.0
    return x.astype(np.float32), mul.astype(np.float32), add.astype(np.float32)


def _gelu_case(m=(2, 29), f=1000, seed=1):
    rng = np.random.default_rng(seed)
    acc = (40 * rng.standard_normal((*m, f))).astype(np.float32)
    row_scales = np.exp(rng.standard_normal((*m, 1)) - 3).astype(np.float32)
    col_scales = np.exp(rng.standard_normal((1, f)) - 3).astype(np.float32)
    bias = rng.standard_normal(f).astype(np.float32)
    return acc, row_scales, col_scales, bias


def test_xla_normed_quantize_matches_layernorm_then_e4m3():
    x, mul, add = _normed_case()
    q = quantize_normed_tokens(jnp.asarray(x), mul, add, EPS, "emulated", writer="xla")
    assert q.values.shape == x.shape and q.scales.shape == (*x.shape[:-1], 1)
    _assert_quantized_like(q.values, q.scales, _np_layernorm(x, mul, add))
    assert float(q.scales[0, 3, 0]) == 1.0  # the constant row normalises to all zeros


def test_xla_gelu_quantize_matches_gelu_of_the_scaled_sums():
    acc, rs, cs, bias = _gelu_case()
    x_q = QuantizedTensor(jnp.zeros(rs.shape), jnp.asarray(rs), layout="tokens:row")
    w_q = QuantizedTensor(jnp.zeros(cs.shape), jnp.asarray(cs), layout="kernel:out_channel")
    q = quantize_gelu_tokens(jnp.asarray(acc), x_q, w_q, jnp.asarray(bias), "emulated")
    _assert_quantized_like(q.values, q.scales, _np_gelu_input(acc, rs, cs, bias))


def test_gelu_epilogue_dense_gives_the_next_linears_quantized_input():
    # fc1 with epilogue "gelu_quantize" = quantize_tokens(gelu(fc1(x))) with fc1 the plain FP8
    # linear computing in float32: the same E4M3 values, up to float32 rounding of the GELU.
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 11, 40)).astype(np.float32)
    w = (0.2 * rng.standard_normal((40, 70))).astype(np.float32)
    params = {"params": {"kernel": w, "bias": rng.standard_normal(70).astype(np.float32)}}
    make = lambda epilogue: Fp8Dense(
        70, (None, None), jnp.float32, jnp.float32, "emulated", epilogue=epilogue
    )  # noqa: E501, E731
    fused = make("gelu_quantize").apply(params, x)
    assert isinstance(fused, QuantizedTensor)
    y = np.asarray(make("linear").apply(params, x), np.float64)
    gelu = 0.5 * y * (1 + np.tanh(TANH_C * (y + 0.044715 * y**3)))
    _assert_quantized_like(fused.values, fused.scales, gelu)


def test_dense_takes_an_already_quantized_input_as_its_own_quantization():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 9, 24)).astype(np.float32))
    module = Fp8Dense(16, (None, None), jnp.float32, jnp.float32, "emulated")
    params = module.init(jax.random.key(0), x)
    want = module.apply(params, x)
    got = module.apply(params, quantize_tokens(x, "emulated"))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="per-token scales"):
        module.apply(params, QuantizedTensor(x, jnp.ones((1, 1, 24)), layout="tokens:channel"))


def test_gelu_epilogue_trains_through_the_straight_through_estimator():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((1, 5, 12)).astype(np.float32))
    fc1 = Fp8Dense(20, (None, None), jnp.float32, jnp.float32, "emulated", epilogue="gelu_quantize")
    params = fc1.init(jax.random.key(0), x)
    grads = jax.grad(lambda p: jnp.sum(fc1.apply(p, x).dequantize() ** 2))(params)
    g = np.asarray(nn.unbox(grads)["params"]["kernel"])
    assert np.isfinite(g).all() and np.abs(g).max() > 0


def test_bad_writer_and_unavailable_triton_writer_are_refused():
    x = jnp.ones((1, 4, 8))
    with pytest.raises(ValueError, match="unknown quantize writer 'cuda'"):
        quantize_tokens(x, "emulated", writer="cuda")
    with pytest.raises(ValueError, match="writer 'triton' cannot run: impl 'emulated'"):
        quantize_tokens(x, "emulated", writer="triton")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="the backend is cpu"):
            quantize_normed_tokens(x, 1.0, 0.0, EPS, "cublaslt", writer="triton")
        assert triton_quantize_support("cublaslt", 8) == "the backend is cpu"


# -- the Triton kernel under the interpreter -------------------------------------------------


def _gelu_rows_both_ways():
    """GELU inputs whose absmax both ways of the kernel must find: rows whose largest GELU is a
    positive u's (GELU(max u) decides), rows whose u all lie below 0.3 (|min GELU| = 0.17004 may be
    the largest: the kernel walks again), an all-negative row, inf / NaN sums, an all-NaN row."""
    acc, rs, cs, bias = _gelu_case(m=(2, 9), f=1000, seed=9)
    u_scale = rs * cs  # [2, 9, 1] x [1, 1000]
    rng = np.random.default_rng(10)
    small = rng.uniform(-3.0, 0.25, (2, 9, 1000))  # u in [-3, 0.25]: GELU(max u) < 0.171
    acc[0, :4] = ((small[0, :4] - bias) / u_scale[0, :4]).astype(np.float32)
    acc[1, 0] = ((-0.75 - 0.01 * rng.random(1000) - bias) / u_scale[1, 0]).astype(np.float32)
    acc[1, 1, 3], acc[1, 1, 8], acc[1, 2, 0] = np.inf, np.nan, -np.inf
    acc[1, 3] = np.nan
    return acc, rs, cs, bias


def _interpreted_cases():
    """(name, prologue, x [M, K] or [B, L, K], operands, reference y float64, kernel_meta
    keywords)."""
    x, mul, add = _normed_case(b=2, length=13, k=300)
    x[1, 2, 5] = np.inf  # LayerNorm of a row with an inf: NaN everywhere in that row
    cases = [("layernorm", "layernorm", x, (mul[:, 0], add[:, 0]), _np_layernorm(x, mul, add), {})]
    acc, rs, cs, bias = _gelu_case(m=(3, 7), f=1000)
    cases.append(("gelu", "gelu", acc, (rs, cs[0], bias), _np_gelu_input(acc, rs, cs, bias), {}))
    acc, rs, cs, bias = _gelu_rows_both_ways()
    y = _np_gelu_input(acc, rs, cs, bias)
    for absmax in ("from_max", "walk"):
        meta = dict(gelu_absmax=absmax)
        cases.append((f"gelu_{absmax}", "gelu", acc, (rs, cs[0], bias), y, meta))
    rng = np.random.default_rng(5)
    plain = (rng.standard_normal((9, 77)) * np.exp(3 * rng.standard_normal((9, 1)))).astype(
        np.float32
    )
    plain[0] = 0.0  # all zero: scale 1
    plain[1, 4], plain[2, 6], plain[2, 7] = np.inf, np.nan, -np.inf
    cases.append(("none", "none", plain, (), plain.astype(np.float64), {}))
    # Several rows per program: a partial last program (18 GELU rows by 4, 9 plain rows by 2),
    # GELU rows that need the second walk beside rows that do not, one batch per program.
    x, mul, add = _normed_case(b=2, length=12, k=300, seed=11)
    y = _np_layernorm(x, mul, add)
    cases.append(("layernorm_4rows", "layernorm", x, (mul[:, 0], add[:, 0]), y, {"rows": 4}))
    acc, rs, cs, bias = _gelu_rows_both_ways()
    y = _np_gelu_input(acc, rs, cs, bias)
    cases.append(("gelu_4rows", "gelu", acc, (rs, cs[0], bias), y, {"rows": 4}))
    cases.append(("none_2rows", "none", plain, (), plain.astype(np.float64), {"rows": 2}))
    return cases


def run_interpreted(path: str) -> None:
    """Runs the row kernel under Triton's interpreter (TRITON_INTERPRET=1) on every case, float32
    quotients out; saves them to `path` (.npz). Called in a subprocess by the fixture below."""
    import torch

    from pallas_kernels import triton_row_quant as rq

    results = {}
    for name, prologue, x, operands, _, meta in _interpreted_cases():
        rows, k = int(np.prod(x.shape[:-1])), x.shape[-1]
        per_batch = x.shape[1] if prologue == "layernorm" else 1
        meta = dict(meta)
        per_program = meta.pop("rows", 1)
        # 128-wide steps: rows of 300 and 1000 values take several, the last one partial.
        call = rq.kernel_meta(
            rows,
            k,
            prologue,
            rows_per_batch=per_batch,
            eps=EPS,
            rows_per_program=per_program,
            chunk=128,
            **meta,
        )
        assert call["meta"]["ROWS"] == per_program
        args = [np.asarray(o, np.float32).reshape(-1) for o in operands]
        args += [np.zeros(1, np.float32)] * (3 - len(args))
        values = torch.full((rows, k), float("nan"))
        scales = torch.full((rows,), float("nan"))
        tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in (x.reshape(rows, k), *args)]
        rq.kernel()[call["grid"]](*tensors, values, scales, **call["meta"])
        results[f"{name}_values"] = values.numpy().reshape(x.shape)
        results[f"{name}_scales"] = scales.numpy().reshape(*x.shape[:-1], 1)
    np.savez(path, **results)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("row_quant")
    return interpreted_results("tests.model.test_fp8_row_quant", "run_interpreted", tmp)


_CASE_NAMES = [case[0] for case in _interpreted_cases()]


@pytest.mark.parametrize("i", range(len(_CASE_NAMES)), ids=_CASE_NAMES)
def test_interpreted_row_kernel_writes_the_saturated_quotients_and_scales(i, interpreted):
    name, _, _, _, y, _ = _interpreted_cases()[i]
    quotients = interpreted[f"{name}_values"].astype(np.float64)
    scales = interpreted[f"{name}_scales"].astype(np.float64)
    np.testing.assert_allclose(scales, _np_scales(y), rtol=1e-5)
    want = np.clip(y / _np_scales(y), -448, 448)
    np.testing.assert_array_equal(np.isnan(quotients), np.isnan(want))  # every value written
    finite = ~np.isnan(want)
    # float32 producer and division: ~1e-6 of the row's largest quotient (448)
    np.testing.assert_allclose(quotients[finite], want[finite], rtol=1e-5, atol=448 * 2e-6)


def test_rows_per_program_shrinks_to_divide_a_layernorm_batch_and_bad_counts_are_refused():
    from pallas_kernels.triton_row_quant import kernel_meta

    meta = lambda prologue, per_batch, n: kernel_meta(  # noqa: E731
        2 * per_batch, 64, prologue, rows_per_batch=per_batch, rows_per_program=n
    )
    assert meta("layernorm", 12, 8)["meta"]["ROWS"] == 4  # 12 rows a batch: 4 divides them
    assert meta("layernorm", 13, 4)["meta"]["ROWS"] == 1
    assert meta("layernorm", 13, 4)["grid"] == (26,)
    assert meta("gelu", 1, 4)["meta"]["ROWS"] == 4  # no batches: any count, a partial program
    assert kernel_meta(9, 64, "none", rows_per_program=4)["grid"] == (3,)
    with pytest.raises(ValueError, match="rows_per_program must be 1, 2, 4 or 8, got 3"):
        meta("none", 1, 3)


# -- the real kernel on a GPU ----------------------------------------------------------------


def _gpu_writers_agree(fn, *args):
    """fn(*args, writer=...) by "triton" (E4M3 values) and "xla": values dequantized."""
    got = {w: jax.jit(lambda *a, w=w: fn(*a, writer=w))(*args) for w in ("triton", "xla")}
    assert got["triton"].values.dtype == jnp.float8_e4m3fn
    return got["triton"], got["xla"]


def _assert_e4m3_close(a: QuantizedTensor, b: QuantizedTensor, y):
    np.testing.assert_allclose(np.asarray(a.scales), np.asarray(b.scales), rtol=1e-5)
    va, vb = (np.asarray(t.values.astype(jnp.float32), np.float64) for t in (a, b))
    np.testing.assert_array_equal(np.isnan(va), np.isnan(vb))
    # Both round float32 quotients that differ by float32 round-off (summation order, division
    # form): a value may sit one E4M3 step apart, rarely.
    finite = ~np.isnan(vb)
    assert np.mean(va[finite] == vb[finite]) >= 0.995
    _assert_quantized_like(va, a.scales, y)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 1031, 1536), (1, 77, 5120)])
def test_gpu_row_kernel_normed_quantize_equals_the_xla_writer(shape):
    b, length, k = shape
    x, mul, add = _normed_case(b, length, k, seed=6)
    fn = lambda x, m, a, writer: quantize_normed_tokens(x, m, a, EPS, "cublaslt", writer=writer)  # noqa: E731
    triton, xla = _gpu_writers_agree(fn, jnp.asarray(x), jnp.asarray(mul), jnp.asarray(add))
    _assert_e4m3_close(triton, xla, _np_layernorm(x, mul, add))


@pytest.mark.gpu
@pytest.mark.parametrize("f", [8960, 13824])
def test_gpu_row_kernel_gelu_quantize_equals_the_xla_writer(f):
    acc, rs, cs, bias = _gelu_case(m=(2, 301), f=f, seed=7)
    acc_bf16 = jnp.asarray(acc, jnp.bfloat16)  # the FP8 GEMM writes bfloat16 sums

    def fn(acc, rs, cs, bias, writer):
        x_q = QuantizedTensor(jnp.zeros(rs.shape), rs, layout="tokens:row")
        w_q = QuantizedTensor(jnp.zeros(cs.shape), cs, layout="kernel:out_channel")
        return quantize_gelu_tokens(acc, x_q, w_q, bias, "cublaslt", writer=writer)

    triton, xla = _gpu_writers_agree(fn, acc_bf16, *(jnp.asarray(v) for v in (rs, cs, bias)))
    y = _np_gelu_input(np.asarray(acc_bf16.astype(jnp.float32)), rs, cs, bias)
    _assert_e4m3_close(triton, xla, y)


@pytest.mark.gpu
def test_gpu_row_kernel_plain_quantize_keeps_nan_saturates_inf_and_zero_rows():
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((3, 40, 5120)) * np.exp(rng.standard_normal((3, 40, 1)))).astype(
        np.float32
    )
    x[0, 0] = 0.0
    x[1, 1, 7], x[1, 2, 9], x[2, 3, 0] = np.inf, np.nan, -np.inf
    xb = jnp.asarray(x, jnp.bfloat16)
    triton, xla = _gpu_writers_agree(
        lambda x, writer: quantize_tokens(x, "cublaslt", writer=writer), xb
    )
    _assert_e4m3_close(triton, xla, np.asarray(xb.astype(jnp.float32), np.float64))
    assert float(triton.scales[0, 0, 0]) == 1.0
    assert float(triton.values[1, 1, 7].astype(jnp.float32)) == 448.0


@pytest.mark.gpu
@pytest.mark.parametrize("rows_per_program", [2, 4])
def test_gpu_row_kernel_several_rows_per_program_write_the_one_row_values(rows_per_program):
    from pallas_kernels.triton_row_quant import quantize_rows

    x, mul, add = _normed_case(2, 1030, 1536, seed=12)  # 1030 rows a batch: 4 shrinks to 2
    acc, rs, cs, bias = _gelu_case(m=(2, 301), f=8960, seed=13)  # 602 rows: a partial program
    calls = {
        "layernorm": lambda n: quantize_rows(
            jnp.asarray(x, jnp.bfloat16), "layernorm", mul[:, 0], add[:, 0], eps=EPS,
            rows_per_program=n,
        ),
        "gelu": lambda n: quantize_rows(
            jnp.asarray(acc, jnp.bfloat16), "gelu", rs, cs[0], bias, rows_per_program=n
        ),
    }  # fmt: skip
    for name, call in calls.items():
        (want, want_scales), (got, got_scales) = call(1), call(rows_per_program)
        # The same arithmetic per row; only the order of a row's sums may differ (float32).
        np.testing.assert_allclose(np.asarray(got_scales), np.asarray(want_scales), rtol=1e-6)
        same = np.asarray(got.astype(jnp.float32)) == np.asarray(want.astype(jnp.float32))
        assert np.mean(same) >= 0.999, name
