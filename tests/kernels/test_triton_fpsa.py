"""The Triton FP8 block-sparse forward (`pallas_kernels.triton_fpsa_fwd`) and its pre-pass.

CPU: the pre-pass against `fpsa_jax.attention.quant` (exact), and the kernel itself under Triton's
interpreter (TRITON_INTERPRET=1, torch CPU tensors). Triton 3.6's interpreter mis-rounds
float32 -> fp8 casts (subnormals flushed, mantissa carries lost), so interpreter runs of the FP8
path set EMULATE_FP8_P, which rounds P to E4M3 in float32 and does the P.V dot in float32; the Q.K
FP8 dot, all indexing and scale folding are the real ones. bf16 loads are also wrong in the
interpreter, so its unquantized runs use fp16.
GPU (marker `gpu`): the jax-triton path end to end.

Tolerances (relative L2 over the whole output). The kernel sees exactly the reference's FP8 Q, K,
V (checked bit for bit below), so against `reference_attention` the gap comes from P: the kernel
rounds p to E4M3 against the running row max, the reference against the final max. Both roundings
carry E4M3's 2^-4 relative step on every p; their difference measured 1.1% at these shapes (the
whole P rounding is ~1.9% against unrounded P; FP8 of Q, K, V adds ~4.5% against bf16 attention).
So 3% separates "P rounded at another max" from real errors (a wrong scale or tile index gives
O(1)). Against `emulate` (the same algorithm in NumPy, same block order) the gap is float32
reassociation, GPU exp2.approx flipping a few E4M3 roundings, and the output cast: 1e-2 on GPU
(2e-3 in the interpreter, which is exact up to the fp16 output).
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fpsa_jax.attention import FPSAConfig
from fpsa_jax.attention.mask import build_mask_info
from fpsa_jax.attention.reference import quantize_qkv, reference_attention
from fpsa_jax.attention.tiling import slot_valid
from fpsa_jax.attention.xla import xla_attention
from pallas_kernels import triton_fpsa_fwd as tf
from pallas_kernels.fp8_prepass import output_from_kernel, quantize_for_kernel

LOG2_E = 1.4426950408889634

# (grid, tile, window, q_group, k_group, heads, head dim): odd grids, edge tiles with holes,
# P = 24 (Pp 64), 90 (Pp 128: 2 key blocks), 192 (Pp 192: BLOCK_M 64, 3 query and key blocks).
CASES = [
    ((3, 5, 6), (2, 3, 4), (1, 2, 1), (1, 1, 1), (1, 1, 1), 2, 32),
    ((5, 7, 9), (3, 5, 6), None, (2, 1, 2), (1, 2, 1), 1, 64),
    ((4, 9, 10), (3, 8, 8), (1, 1, 2), (1, 1, 1), (2, 2, 2), 2, 32),
    ((7, 6, 13), (2, 3, 4), (3, 1, 2), (1, 2, 3), (3, 1, 1), 1, 64),
]


def _inputs(grid, heads, d, dtype, seed=0):
    length = math.prod(grid)
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(kk, (1, length, heads, d), jnp.float32).astype(dtype) for kk in keys]


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def emulate(ops, kv_tiles, scale, p_scale, fp8):
    """The kernel's algorithm in NumPy, block by block: raw output [B, N, Lp, D] float32."""
    q, k = (np.asarray(x).astype(np.float32) for x in (ops.q, ops.k))
    v = np.swapaxes(np.asarray(ops.v_t).astype(np.float32), 2, 3)  # [B, N, Lp, D]
    qs, ks, vs = (np.asarray(x) for x in (ops.q_scale, ops.k_scale, ops.v_scale))
    bias = np.asarray(ops.key_bias)
    pp, bn = ops.padded_tile, tf.BLOCK_N
    out = np.zeros_like(q)
    for u in range(q.shape[2] // pp):
        rows = slice(u * pp, (u + 1) * pp)
        m = np.full(q.shape[:2] + (pp,), -1e30, np.float32)
        l_sum = np.zeros_like(m)
        acc = np.zeros(q.shape[:2] + (pp, q.shape[3]), np.float32)
        for t in kv_tiles[u]:
            for j in range(pp // bn):
                cols = slice(t * pp + j * bn, t * pp + (j + 1) * bn)
                pair = (qs[:, :, u] * ks[:, :, t] * np.float32(scale * LOG2_E))[..., None, None]
                s = np.einsum("bnqd,bnkd->bnqk", q[:, :, rows], k[:, :, cols]) * pair + bias[cols]
                m_new = np.maximum(m, s.max(-1))
                alpha = np.exp2(m - m_new)
                p = np.exp2(s - m_new[..., None])
                l_sum = l_sum * alpha + p.sum(-1)
                p = p * np.float32(p_scale)
                if fp8:
                    p = p.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
                acc = acc * alpha[..., None] + np.einsum("bnqk,bnkd->bnqd", p, v[:, :, cols])
                m = m_new
        out[:, :, rows] = acc / (l_sum * np.float32(p_scale))[..., None] * vs[:, :, None, :]
    return out


# ----------------------------------------------------------------------------- pre-pass (CPU)


@pytest.mark.parametrize("case", CASES)
def test_prepass_matches_fpsa_quantization(case):
    grid, tile, window, qg, kg, heads, d = case
    config = FPSAConfig(tile=tile, window=window, quant="fp8", q_group=qg, k_group=kg)
    q, k, v = _inputs(grid, heads, d, jnp.bfloat16)
    ops = quantize_for_kernel(q, k, v, grid, config, block_n=tf.BLOCK_N)
    n_tiles, p = math.prod(config.tile_grid(grid)), config.tile_volume
    assert ops.q.dtype == ops.k.dtype == ops.v_t.dtype == jnp.float8_e4m3fn
    assert ops.q.shape == (1, heads, n_tiles * ops.padded_tile, d)
    assert ops.v_t.shape == (1, heads, d, n_tiles * ops.padded_tile)
    assert ops.padded_tile % tf.BLOCK_N == 0 and p <= ops.padded_tile < p + tf.BLOCK_N
    # The kernel's inputs are exactly the reference's fake-quantized Q, K, V.
    for got, want in zip(ops.dequantize(), quantize_qkv(q, k, v, grid, config), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # Padded slots hold zeros and are exactly the -inf key slots.
    valid = np.zeros((n_tiles, ops.padded_tile), bool)
    valid[:, :p] = slot_valid(grid, tile)
    valid = valid.reshape(-1)
    np.testing.assert_array_equal(np.asarray(ops.key_bias) == 0, valid)
    assert np.isneginf(np.asarray(ops.key_bias)[~valid]).all()
    for x in (ops.q, ops.k, jnp.swapaxes(ops.v_t, 2, 3)):
        assert not np.asarray(x.astype(jnp.float32))[:, :, ~valid].any()


def test_prepass_unquantized_keeps_values():
    grid, tile = (3, 5, 6), (2, 3, 4)
    config = FPSAConfig(tile=tile, window=(1, 2, 1))
    q, k, v = _inputs(grid, 2, 32, jnp.bfloat16)
    ops = quantize_for_kernel(q, k, v, grid, config, block_n=tf.BLOCK_N)
    assert ops.q.dtype == jnp.bfloat16
    for got, want in zip(ops.dequantize(), (q, k, v), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want, np.float32))


# ----------------------------------------------------------------------------- errors (CPU)


def test_rejects_missing_config_unquantized_float32_and_bad_head_dim():
    q, k, v = _inputs((2, 2, 2), 1, 32, jnp.float32)
    with pytest.raises(ValueError, match="needs an FPSAConfig"):
        tf.triton_attention(q, k, v, grid=(2, 2, 2), config=None, scale=0.1)
    with pytest.raises(NotImplementedError, match="16-bit operands"):
        tf.triton_attention(q, k, v, grid=(2, 2, 2), config=FPSAConfig(tile=(1, 2, 2)), scale=0.1)
    q, k, v = _inputs((2, 2, 2), 1, 48, jnp.bfloat16)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        cfg = FPSAConfig(tile=(1, 2, 2), quant="fp8")
        tf.triton_attention(q, k, v, grid=(2, 2, 2), config=cfg, scale=0.1)


# ----------------------------------------------------------------------------- interpreter (CPU)


def _fp8_setup(case, seed):
    grid, tile, window, qg, kg, heads, d = case
    config = FPSAConfig(tile=tile, window=window, quant="fp8", q_group=qg, k_group=kg)
    q, k, v = _inputs(grid, heads, d, jnp.float16, seed=seed)
    return config, (q, k, v), 1 / math.sqrt(d)


def _none_setup(case, seed):
    grid, tile, window, _, _, heads, d = case
    return FPSAConfig(tile=tile, window=window), _inputs(grid, heads, d, jnp.float16, seed), 0.2


# (name, setup, case, seed, emulate P): the interpreter runs; fp16 everywhere (see docstring).
INTERPRETED = [(f"fp8_{i}", _fp8_setup, c, 1, True) for i, c in enumerate(CASES)]
INTERPRETED += [(f"none_{i}", _none_setup, c, 2, False) for i, c in enumerate(CASES[:3])]


def _prepared(setup, case, seed):
    config, (q, k, v), scale = setup(case, seed)
    grid = case[0]
    info = build_mask_info(grid, config.tile, config.window)
    ops = quantize_for_kernel(q, k, v, grid, config, block_n=tf.BLOCK_N)
    p_scale = config.scale if config.quant == "fp8" else 1.0
    return config, (q, k, v), scale, info, ops, p_scale


def run_interpreted(path):
    """Runs every INTERPRETED case through Triton's interpreter; saves raw outputs to `path`.

    Needs TRITON_INTERPRET=1 before Triton is first imported (Triton's own jit helpers such as
    tl.zeros are built at import), so the test runs this in a fresh process.
    """
    import torch

    kernel = tf.make_kernel()

    def as_torch(x):
        x = np.ascontiguousarray(np.asarray(x))
        if x.dtype == jnp.float8_e4m3fn:
            return torch.from_numpy(x.view(np.uint8).copy()).view(torch.float8_e4m3fn)
        return torch.from_numpy(x.copy())

    results = {}
    for name, setup, case, seed, emulate_p in INTERPRETED:
        _, _, scale, info, ops, p_scale = _prepared(setup, case, seed)
        launch = tf.kernel_params(ops, info.kv_count, scale, p_scale, emulate_p=emulate_p)
        args = [as_torch(x) for x in (ops.q, ops.k, ops.v_t, ops.q_scale, ops.k_scale)]
        args += [as_torch(x) for x in (ops.v_scale, ops.key_bias, info.kv_tiles)]
        out = torch.full(tuple(ops.q.shape), float("nan"), dtype=torch.float16)  # poisoned
        kernel[launch["grid"]](*args, out, **launch["meta"])
        results[name] = out.float().numpy()
    np.savez(path, **results)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("interp") / "raw.npz"
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    code = f"from tests.kernels.test_triton_fpsa import run_interpreted as r; r({str(path)!r})"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(path))


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(CASES)))
def test_interpreted_fp8_kernel_matches_emulation_and_reference(i, interpreted):
    name, setup, case, seed, _ = INTERPRETED[i]
    config, (q, k, v), scale, info, ops, p_scale = _prepared(setup, case, seed)
    raw = interpreted[name]
    assert np.isfinite(raw).all()  # every element, padded rows included, was written
    assert _rel(raw, emulate(ops, info.kv_tiles, scale, p_scale, fp8=True)) < 2e-3
    out = output_from_kernel(jnp.asarray(raw), ops)
    ref = reference_attention(q, k, v, grid=case[0], config=config, scale=scale)
    assert _rel(out, ref) < 0.03


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(CASES), len(INTERPRETED)))
def test_interpreted_unquantized_kernel_matches_reference(i, interpreted):
    name, setup, case, seed, _ = INTERPRETED[i]
    config, (q, k, v), scale, _, ops, _ = _prepared(setup, case, seed)
    raw = interpreted[name]
    assert np.isfinite(raw).all()
    out = output_from_kernel(jnp.asarray(raw), ops)
    ref = reference_attention(q, k, v, grid=case[0], config=config, scale=scale)
    assert _rel(out, ref) < 2e-3


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_fp8_forward_matches_reference(case):
    grid, tile, window, qg, kg, heads, d = case
    config = FPSAConfig(tile=tile, window=window, quant="fp8", q_group=qg, k_group=kg)
    q, k, v = _inputs(grid, heads, d, jnp.bfloat16, seed=3)
    scale = 1 / math.sqrt(d)
    out = jax.jit(lambda *a: tf.triton_attention(*a, grid=grid, config=config, scale=scale))(
        q, k, v
    )
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape
    assert np.isfinite(np.asarray(out, np.float32)).all()
    ref = reference_attention(q, k, v, grid=grid, config=config, scale=scale)
    assert _rel(out, ref) < 0.03


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_fp8_kernel_writes_every_element_as_emulated(case):
    grid, tile, window, qg, kg, heads, d = case
    config = FPSAConfig(tile=tile, window=window, quant="fp8", q_group=qg, k_group=kg)
    q, k, v = _inputs(grid, heads, d, jnp.bfloat16, seed=4)
    info = build_mask_info(grid, tile, window)
    ops = quantize_for_kernel(q, k, v, grid, config, block_n=tf.BLOCK_N)
    # Poison: free a NaN buffer of the output's size so the allocator likely hands it back.
    poison = jnp.full(ops.q.shape, jnp.nan, jnp.float32).block_until_ready()
    del poison
    raw = tf.launch_kernel(ops, info.kv_tiles, scale=0.15, p_scale=448.0, out_dtype=jnp.float32)
    raw = np.asarray(raw)
    assert np.isfinite(raw).all()
    # Padded query rows too: all of [B, N, Lp, D] must equal the emulation.
    assert _rel(raw, emulate(ops, info.kv_tiles, 0.15, 448.0, fp8=True)) < 1e-2


@pytest.mark.gpu
def test_bf16_forward_matches_reference():
    grid, tile, window = (5, 7, 9), (3, 5, 6), (1, 2, 1)
    config = FPSAConfig(tile=tile, window=window)
    q, k, v = _inputs(grid, 2, 64, jnp.bfloat16, seed=5)
    out = tf.triton_attention(q, k, v, grid=grid, config=config, scale=0.125)
    ref = reference_attention(q, k, v, grid=grid, config=config, scale=0.125)
    assert _rel(out, ref) < 1e-2


@pytest.mark.gpu
def test_wan_shape_matches_xla():
    grid, tile, window = (21, 30, 52), (3, 8, 8), (3, 2, 3)  # 18 of 196 key tiles: 91% sparse
    config = FPSAConfig(tile=tile, window=window, quant="fp8")
    q, k, v = _inputs(grid, 12, 128, jnp.bfloat16, seed=6)
    scale = 1 / math.sqrt(128)
    out = jax.jit(lambda *a: tf.triton_attention(*a, grid=grid, config=config, scale=scale))(
        q, k, v
    )
    assert np.isfinite(np.asarray(out, np.float32)).all()
    want = jax.jit(lambda *a: xla_attention(*a, grid=grid, config=config, scale=scale))(q, k, v)
    assert _rel(out, want) < 0.03


@pytest.mark.gpu
def test_gradient_raises():
    grid, config = (2, 4, 4), FPSAConfig(tile=(1, 4, 4), quant="fp8")
    q, k, v = _inputs(grid, 1, 32, jnp.bfloat16)
    loss = lambda q: tf.triton_attention(q, k, v, grid=grid, config=config, scale=0.2).sum()
    with pytest.raises(NotImplementedError, match="use impl='xla' for training"):
        jax.grad(loss)(q)
