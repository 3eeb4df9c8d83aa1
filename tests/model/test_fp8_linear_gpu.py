"""The FP8 linears' real path (impl "cublaslt", cuBLASLt's FP8 GEMM) against the emulation, on a
GPU with FP8 tensor cores (`gpu` marker; skipped on CPU, and here also below compute capability
8.9).

One linear: both impls multiply the same E4M3 values (products exact) and differ only in how the
float32 sums are formed: cuBLASLt's FP8 kernels may accumulate with fewer bits (fast
accumulation) before promoting to float32. So the two must agree far more closely than either
agrees with the unquantized bf16 matmul: the tests ask for a tenth of the quantization error
(~3e-2 here), and the float64 NumPy reference of tests/model/test_fp8_linear.py bounds the
emulation itself. A whole DiT block: the real path must be as close to the bf16 model as the
emulation is.

Every program compiles with `compiler_options(linear_quant, impl)`, as the sampler and the
benchmarks do: with XLA's defaults its autotuner picks Triton GEMM fusions for these dots (a
split-K one at a few hundred rows) and, at 14B shapes, did not finish compiling. The tests also
check that the real path is cuBLASLt's FP8 GEMM, at token counts of a real latent.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpsa_jax.config import WanConfig
from fpsa_jax.model.fp8_linear import Fp8Dense, compiler_options, fp8_gemm_support
from fpsa_jax.model.random_weights import random_weights
from fpsa_jax.model.wan import WanModel, init_params
from tests.model.test_fp8_linear import _np_fp8_dense

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


def _f8_gemm_columns(hlo: str, rows: int) -> int:
    """Sum of N over the cuBLASLt FP8 GEMMs of `hlo` whose output is f32/bf16 [rows, N]."""
    total = 0
    for line in hlo.splitlines():
        if F8_CALL in line:
            shape = re.search(r"= \((?:f32|bf16)\[(\d+),(\d+)\]", line)
            if shape and int(shape.group(1)) == rows:
                total += int(shape.group(2))
    return total


def _operands(m=(2, 2100), k=1024, n=384, seed=0):
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
        options = compiler_options("fp8", impl)
        compiled = jax.jit(module.apply, compiler_options=options).lower(params, x).compile()
        assert (F8_CALL in compiled.as_text()) == (impl == "cublaslt"), impl
        out[impl] = compiled(params, x)
    # On the GPU a few E4M3 roundings of x / s differ from NumPy's (XLA divides as x * (1 / s),
    # which moves values that sit on a rounding tie; seen: 291 of 1.6M outputs, each one E4M3
    # step of one input off): so here the emulation agrees with the float64 reference to a
    # thirtieth of the quantization error, not bit for bit as on the CPU.
    assert _rel(out["emulated"], _np_fp8_dense(x, w, b)) < 1e-3
    exact = x.astype(np.float64) @ w + b
    quant_error = _rel(out["emulated"], exact)
    assert 1e-2 < quant_error < 0.1
    assert _rel(out["cublaslt"], out["emulated"]) < 0.1 * quant_error


def test_fp8_dit_runs_every_token_linear_on_the_fp8_gemm_and_matches_the_emulation():
    # One block, Wan-1.3B widths, a 2 x (4, 48, 48) latent: 2 x 2304 tokens per linear. The text
    # k/v see only 2 x 7 rows (XLA's choice of GEMM there is its own).
    cfg = WanConfig.preset("t2v-1.3b", linear_quant="fp8", num_layers=1, text_len=7)
    params = random_weights(lambda key: init_params(cfg, key), jax.random.key(0), std=0.02)
    rng = np.random.default_rng(0)
    args = (
        rng.standard_normal((2, 4, 48, 48, cfg.in_dim)).astype(np.float32),
        np.array([200.0, 800.0], np.float32),
        rng.standard_normal((2, 7, cfg.text_dim)).astype(np.float32),
    )
    out = {}
    for impl in ("cublaslt", "emulated"):
        model = WanModel(cfg, linear_impl=impl)
        compiled = jax.jit(
            lambda p, *a, m=model: m.apply({"params": p}, *a),
            compiler_options=compiler_options("fp8", impl),
        )
        compiled = compiled.lower(params, *args).compile()
        # 8 token linears: self-attention q, k, v, o; cross-attention q, o; the FFN's two. XLA
        # merges q, k, v (same input) into one GEMM, so count output columns of the FP8 GEMMs
        # over the 2 x 2304 token rows, not calls.
        columns = _f8_gemm_columns(compiled.as_text(), rows=2 * 4 * 24 * 24)
        d, ffn = cfg.dim, cfg.ffn_dim
        assert columns == (3 * d + 3 * d + ffn + d if impl == "cublaslt" else 0), (impl, columns)
        out[impl] = compiled(params, *args)
    bf16 = WanModel(cfg.replace(linear_quant="none")).apply({"params": params}, *args)
    quant_error = _rel(out["emulated"], bf16)
    assert quant_error > 1e-3
    # Through a whole block the two impls drift apart by a fraction of the quantization error
    # itself (seen on an H200: 0.030 against 0.047): every linear re-rounds its input to E4M3, so
    # a float32-sum difference that moves one value across a rounding boundary changes all that
    # follows. What must hold is that the real path is as accurate as the emulation.
    print(f"rel L2 vs bf16: emulated {quant_error:.4f}, cublaslt {_rel(out['cublaslt'], bf16):.4f}")
    assert _rel(out["cublaslt"], bf16) < 1.25 * quant_error
    assert _rel(out["cublaslt"], out["emulated"]) < quant_error
