"""The FP8 linears' real path (impl "cublaslt", cuBLASLt's FP8 GEMM) against the emulation, on a
GPU with FP8 tensor cores (`gpu` marker; skipped on CPU, and here also below compute capability
8.9).

Both impls multiply the same E4M3 values (products exact) and differ only in how the float32 sums
are formed: cuBLASLt's FP8 kernels may accumulate with fewer bits (fast accumulation) before
promoting to float32. So the two must agree far more closely than either agrees with the
unquantized bf16 matmul: the tests ask for a tenth of the quantization error (~3e-2 here), and the
float64 NumPy reference of tests/model/test_fp8_linear.py bounds the emulation itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpsa_jax.config import WanConfig
from fpsa_jax.model.fp8_linear import Fp8Dense, fp8_gemm_support
from fpsa_jax.model.random_weights import random_weights
from fpsa_jax.model.wan import WanModel, init_params
from tests.model.test_fp8_linear import _assert_close, _np_fp8_dense

F8_CALL = "__cublas$lt$matmul$f8"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        jax.default_backend() == "gpu" and fp8_gemm_support() is not None,
        reason="needs FP8 tensor cores (compute capability >= 8.9)",
    ),
]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _operands(m=(2, 200), k=1024, n=384, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*m, k)) * np.exp(rng.standard_normal((*m, 1)))
    w = rng.standard_normal((k, n)) * np.exp(0.5 * rng.standard_normal((1, n)))
    return x.astype(np.float32), w.astype(np.float32), rng.standard_normal(n).astype(np.float32)


def test_cublaslt_fp8_dense_runs_the_fp8_gemm_and_matches_the_emulation():
    x, w, b = _operands()
    params = {"params": {"kernel": w, "bias": b}}
    out = {}
    for impl in ("cublaslt", "emulated"):
        module = Fp8Dense(w.shape[1], ("embed", "mlp"), jnp.float32, jnp.float32, impl)
        compiled = jax.jit(module.apply).lower(params, x).compile()
        assert (F8_CALL in compiled.as_text()) == (impl == "cublaslt"), impl
        out[impl] = compiled(params, x)
    _assert_close(out["emulated"], _np_fp8_dense(x, w, b))
    exact = x.astype(np.float64) @ w + b
    quant_error = _rel(out["emulated"], exact)
    assert 1e-2 < quant_error < 0.1
    assert _rel(out["cublaslt"], out["emulated"]) < 0.1 * quant_error


def test_fp8_dit_runs_every_block_linear_on_the_fp8_gemm_and_matches_the_emulation():
    cfg = WanConfig.preset("tiny", linear_quant="fp8")
    params = random_weights(lambda key: init_params(cfg, key), jax.random.key(0), std=0.05)
    rng = np.random.default_rng(0)
    args = (
        rng.standard_normal((2, 3, 8, 8, cfg.in_dim)).astype(np.float32),
        np.array([200.0, 800.0], np.float32),
        rng.standard_normal((2, 7, cfg.text_dim)).astype(np.float32),
    )
    out = {}
    for impl in ("cublaslt", "emulated"):
        model = WanModel(cfg, linear_impl=impl)
        compiled = jax.jit(lambda p, *a, m=model: m.apply({"params": p}, *a))
        compiled = compiled.lower(params, *args).compile()
        calls = compiled.as_text().count(F8_CALL)
        # 10 block linears (q, k, v, o twice, the FFN's two) in the scanned block.
        assert calls >= 10 if impl == "cublaslt" else calls == 0, (impl, calls)
        out[impl] = compiled(params, *args)
    bf16 = WanModel(cfg.replace(linear_quant="none")).apply({"params": params}, *args)
    quant_error = _rel(out["emulated"], bf16)
    assert quant_error > 1e-3
    assert _rel(out["cublaslt"], out["emulated"]) < 0.1 * quant_error
