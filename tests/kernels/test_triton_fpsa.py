"""impl="triton": the FP8 block-sparse forward, the block-sparse backward and the pre-pass.

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

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fpsa_jax.attention import FPSAConfig
from fpsa_jax.attention.kernel_layout import (
    from_kernel_layout,
    kernel_scales,
    key_block_list,
    output_from_kernel,
    quantize_for_kernel,
    slot_tokens,
    to_kernel_layout,
)
from fpsa_jax.attention.mask import build_mask_info
from fpsa_jax.attention.quant import channel_scales, safe_scale
from fpsa_jax.attention.reference import quantize_qkv, reference_attention
from fpsa_jax.attention.tiling import slot_valid, token_mask
from fpsa_jax.attention.triton import triton_attention
from fpsa_jax.attention.xla import xla_attention
from fpsa_jax.config import WanConfig
from fpsa_jax.model.wan import WanModel, init_params
from pallas_kernels import triton_fpsa_bwd as tb
from pallas_kernels import triton_fpsa_fwd as tf
from pallas_kernels import triton_fpsa_prepass as tp
from tests.kernels.kernel_suite import KernelBehaviour
from tests.triton_interpreter import interpreted_results

LOG2_E = 1.4426950408889634

# (grid, tile, window, q_group, k_group, heads, head dim): odd grids, edge tiles with holes,
# P = 24 (Pp 64), 90 (Pp 128: 2 key blocks), 192 (Pp 192: BLOCK_M 64, 3 query and key blocks),
# and tiles (2, 8, 8) on (3, 5, 6), 60 and 30 real slots of 128: all-padding key and query blocks.
CASES = [
    ((3, 5, 6), (2, 3, 4), (1, 2, 1), (1, 1, 1), (1, 1, 1), 2, 32),
    ((5, 7, 9), (3, 5, 6), None, (2, 1, 2), (1, 2, 1), 1, 64),
    ((4, 9, 10), (3, 8, 8), (1, 1, 2), (1, 1, 1), (2, 2, 2), 2, 32),
    ((7, 6, 13), (2, 3, 4), (3, 1, 2), (1, 2, 3), (3, 1, 1), 1, 64),
    ((3, 5, 6), (2, 8, 8), None, (1, 1, 1), (1, 1, 1), 1, 32),  # whole padding blocks (Pp 128)
]


def _inputs(grid, heads, d, dtype, seed=0):
    length = math.prod(grid)
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(kk, (1, length, heads, d), jnp.float32).astype(dtype) for kk in keys]


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def emulate(ops, blocks, scale, p_scale, fp8, block_m):
    """The kernel's algorithm in NumPy, block by block over the key-block list `blocks`
    (`KeyBlockList` at BLOCK_N): raw output [B, N, Lp, D] float32 and lse2 [B, N, Lp]; query
    blocks of `block_m` rows that are all padding get zeros and lse2 0, as in the kernel."""
    q, k = (np.asarray(x).astype(np.float32) for x in (ops.q, ops.k))
    v = np.swapaxes(np.asarray(ops.v_t).astype(np.float32), 2, 3)  # [B, N, Lp, D]
    qs, ks, vs = (np.asarray(x) for x in (ops.q_scale, ops.k_scale, ops.v_scale))
    bias = np.asarray(ops.key_bias)
    pp, bn = ops.padded_tile, tf.BLOCK_N
    out = np.zeros_like(q)
    lse = np.zeros(q.shape[:3], np.float32)
    for u in range(q.shape[2] // pp):
        rows = slice(u * pp, (u + 1) * pp)
        m = np.full(q.shape[:2] + (pp,), -1e30, np.float32)
        l_sum = np.zeros_like(m)
        acc = np.zeros(q.shape[:2] + (pp, q.shape[3]), np.float32)
        for block in blocks.blocks[u, : blocks.count[u]]:
            t = block // (pp // bn)
            cols = slice(block * bn, (block + 1) * bn)
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
        lse[:, :, rows] = m + np.log2(l_sum)
    dead = np.repeat(~np.any(bias.reshape(-1, block_m) == 0, axis=1), block_m)  # [Lp]
    out[:, :, dead], lse[:, :, dead] = 0.0, 0.0
    return out, lse


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
    # Padded slots hold zeros, are exactly the -inf key slots, and come last in each tile.
    valid = np.zeros((n_tiles, ops.padded_tile), bool)
    valid[:, :p] = np.sort(slot_valid(grid, tile), axis=1)[:, ::-1]
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
        triton_attention(q, k, v, grid=(2, 2, 2), config=None, scale=0.1)
    with pytest.raises(NotImplementedError, match="16-bit operands"):
        triton_attention(q, k, v, grid=(2, 2, 2), config=FPSAConfig(tile=(1, 2, 2)), scale=0.1)
    q, k, v = _inputs((2, 2, 2), 1, 48, jnp.bfloat16)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        cfg = FPSAConfig(tile=(1, 2, 2), quant="fp8")
        triton_attention(q, k, v, grid=(2, 2, 2), config=cfg, scale=0.1)
    q, k, v = _inputs((2, 2, 2), 1, 16, jnp.bfloat16)
    with pytest.raises(ValueError, match="FP8 needs a head dim D >= 32"):
        triton_attention(q, k, v, grid=(2, 2, 2), config=cfg, scale=0.1)


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


def _blocks(grid, config, ops):
    return key_block_list(grid, config.tile, config.window, ops.padded_tile, tf.BLOCK_N)


def _cotangent(case, seed):
    """A random dO [B, L, N, D] float32 for a case."""
    grid, *_, heads, d = case
    return jax.random.normal(jax.random.key(seed + 100), (1, math.prod(grid), heads, d))


def dense_gradients(q, k, v, do, mask, scale):
    """Float64 NumPy attention backward from the textbook formulas (o recomputed here).

    q, k, v, do: [B, L, N, D]; mask: bool [L, L] (allowed pairs). Returns (dq, dk, dv).
    """
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    s = np.where(mask, np.einsum("bqnd,bknd->bnqk", q, k) * scale, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bnqk,bknd->bqnd", p, v)
    dv = np.einsum("bnqk,bqnd->bknd", p, do)
    dp = np.einsum("bqnd,bknd->bnqk", do, v)
    ds = p * (dp - np.einsum("bqnd,bqnd->bnq", do, o)[..., None])
    dq = np.einsum("bnqk,bknd->bqnd", ds, k) * scale
    dk = np.einsum("bnqk,bqnd->bknd", ds, q) * scale
    return dq, dk, dv


def run_interpreted(path):
    """Runs every INTERPRETED case, forward then backward, through Triton's interpreter; saves
    the raw kernel outputs to `path`.

    Needs TRITON_INTERPRET=1 before Triton is first imported (Triton's own jit helpers such as
    tl.zeros are built at import), so the test runs this in a fresh process. The backward gets
    fp16 dequantized Q, K, V (as `fpsa_jax.attention.triton` does, in fp16 for the interpreter).
    """
    import torch

    fwd = tf.make_kernel()
    dq_kernel, dkdv_kernel = tb.make_kernels()
    tp.kernel.cache_clear()  # built under the interpreter in this process
    tp.channel_absmax_kernel.cache_clear()

    def as_torch(x):
        x = np.ascontiguousarray(np.asarray(x))
        if x.dtype == jnp.float8_e4m3fn:
            return torch.from_numpy(x.view(np.uint8).copy()).view(torch.float8_e4m3fn)
        return torch.from_numpy(x.copy())

    def poisoned(shape, dtype):
        return torch.full(tuple(shape), float("nan"), dtype=dtype)

    results = {}
    for name, setup, case, seed, emulate_p in INTERPRETED:
        config, qkv, scale, info, ops, p_scale = _prepared(setup, case, seed)
        launch = tf.default_launch(ops.padded_tile)
        table = slot_tokens(case[0], config.tile, ops.padded_tile)
        args = [as_torch(x) for x in (ops.q, ops.k, ops.v_t, ops.q_scale, ops.k_scale)]
        blocks = _blocks(case[0], config, ops)
        args += [as_torch(x) for x in (ops.v_scale, ops.key_bias, blocks.blocks, blocks.count)]
        args.append(as_torch(table))
        # Kernel layout, then token order (the same rows stored through the slot table).
        for suffix, tokens in (("o", None), ("o_tokens", math.prod(case[0]))):
            call = tf.kernel_meta(
                ops.q.shape,
                ops.padded_tile,
                blocks.blocks.shape[1],
                scale,
                p_scale,
                launch,
                emulate_p,
                tokens,
                while_loop=True,
            )
            b, n, _, d = ops.q.shape
            out = poisoned(ops.q.shape if tokens is None else (b, tokens, n, d), torch.float16)
            lse = poisoned(ops.q.shape[:3], torch.float32)
            fwd[call["grid"]](*args, out, lse, **call["meta"])
            results[f"{name}_{suffix}"], results[f"{name}_lse"] = out.float().numpy(), lse.numpy()

        # The pre-pass kernel, float32 out (the interpreter's fp8 cast is wrong, see above).
        scales = kernel_scales(*qkv, case[0], config)
        modes = ("tile", "tile", "channel") if config.quant == "fp8" else ("none",) * 3
        for label, x, s, mode in zip("qkv", qkv, scales, modes, strict=True):
            pre = tp.kernel_meta(x.shape, ops.padded_tile, table.size, mode, label == "v")
            b, _, n, d = x.shape
            shape = (b, n, d, table.size) if label == "v" else (b, n, table.size, d)
            values = poisoned(shape, torch.float32 if mode != "none" else torch.float16)
            placeholder = torch.zeros(1)
            tp.kernel()[pre["grid"]](
                as_torch(x), as_torch(s), as_torch(table), values, placeholder, **pre["meta"]
            )
            results[f"{name}_prepass_{label}"] = values.float().numpy()
            if mode == "tile":  # the kernel finding the tile scales, 16 slots a step, unrolled
                small = tp.PrepassLaunch(block_p=16, num_warps=2, unroll_walks=True)
                pre = tp.kernel_meta(
                    x.shape, ops.padded_tile, table.size, "tile_absmax", False, small
                )
                values, found = poisoned(shape, torch.float32), poisoned(s.shape, torch.float32)
                tp.kernel()[pre["grid"]](
                    as_torch(x), placeholder, as_torch(table), values, found, **pre["meta"]
                )
                results[f"{name}_prepass_{label}_absmax"] = values.numpy()
                results[f"{name}_prepass_{label}_absmax_scales"] = found.numpy()

        # Backward on the dequantized values, dO in the kernel layout (padded rows zero).
        q_hat, k_hat, v_hat = (as_torch(x) for x in ops.dequantized(jnp.float16))
        do = to_kernel_layout(_cotangent(case, seed), case[0], config.tile, ops.padded_tile)
        delta = np.sum(np.asarray(do, np.float32) * results[f"{name}_o"], axis=-1)
        do = as_torch(do.astype(jnp.float16))
        back = tb.kernel_meta(ops.q.shape, ops.padded_tile, scale, tb.BackwardLaunch())
        common = [q_hat, k_hat, v_hat, do, lse, as_torch(delta), as_torch(ops.key_bias)]
        dq = poisoned(ops.q.shape, torch.float32)
        dk, dv = poisoned(ops.q.shape, torch.float32), poisoned(ops.q.shape, torch.float32)
        dq_kernel[back["dq_grid"]](
            *common, as_torch(info.kv_tiles), dq, KV_COUNT=info.kv_count, **back["meta"]
        )
        tables = [as_torch(info.q_tiles), as_torch(info.q_count)]
        dkdv_kernel[back["dkdv_grid"]](
            *common, *tables, dk, dv, MAX_Q=info.q_tiles.shape[1], WHILE_LOOP=True, **back["meta"]
        )
        for grad, x in (("dq", dq), ("dk", dk), ("dv", dv)):
            results[f"{name}_{grad}"] = x.numpy()

    # V's channel absmax on an odd shape: 3 token blocks (the last partial), channels not a
    # multiple of the program's 512, an inf, a NaN and one channel all NaN (each counts as 0).
    v = _channel_absmax_input()
    call = tp.channel_absmax_meta(v.shape, block_l=8, unroll=2)
    partial = poisoned(call["partial"], torch.float32)
    b, length, n, d = v.shape
    tp.channel_absmax_kernel()[call["grid"]](
        as_torch(v.reshape(b, length, n * d)), partial, **call["meta"]
    )
    results["channel_absmax"] = partial.amax(dim=1).numpy().reshape(b, n, d)
    np.savez(path, **results)


def _channel_absmax_input():
    v = np.random.default_rng(5).standard_normal((2, 1100, 3, 40)).astype(np.float16)
    v[0, 17, 1, 5], v[1, 1099, 2, 39], v[:, :, 0, 7] = np.inf, -np.inf, np.nan
    v[1, 600, 2, 3] = -60000.0  # the largest |x|, negative, in the second block
    return v


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interp")
    return interpreted_results("tests.kernels.test_triton_fpsa", "run_interpreted", tmp)


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(CASES)))
def test_interpreted_fp8_kernel_matches_emulation_and_reference(i, interpreted):
    name, setup, case, seed, _ = INTERPRETED[i]
    config, (q, k, v), scale, info, ops, p_scale = _prepared(setup, case, seed)
    raw, lse = interpreted[f"{name}_o"], interpreted[f"{name}_lse"]
    assert np.isfinite(raw).all() and np.isfinite(lse).all()  # every element was written
    block_m = tf.default_launch(ops.padded_tile).block_m
    want, want_lse = emulate(ops, _blocks(case[0], config, ops), scale, p_scale, True, block_m)
    assert _rel(raw, want) < 2e-3
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
    out = output_from_kernel(jnp.asarray(raw), ops)
    ref = reference_attention(q, k, v, grid=case[0], config=config, scale=scale)
    assert _rel(out, ref) < 0.03


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(INTERPRETED)))
def test_interpreted_token_order_output_equals_the_kernel_layout_one(i, interpreted):
    name, setup, case, seed, _ = INTERPRETED[i]
    ops = _prepared(setup, case, seed)[4]
    got = interpreted[f"{name}_o_tokens"]
    assert np.isfinite(got).all()  # every token written (the poison was NaN)
    want = output_from_kernel(jnp.asarray(interpreted[f"{name}_o"]), ops)
    np.testing.assert_array_equal(got, np.asarray(want))


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(INTERPRETED)))
def test_interpreted_prepass_kernel_scales_and_lays_out_like_xla(i, interpreted):
    """x / scale, saturated, in the kernel layout, padded slots zero: exactly the XLA pre-pass
    before its E4M3 rounding (which the interpreter cannot do; the GPU test checks the cast)."""
    name, setup, case, seed, _ = INTERPRETED[i]
    config, qkv, _, _, ops, _ = _prepared(setup, case, seed)
    grid, pp = case[0], ops.padded_tile
    scales = [np.asarray(x) for x in kernel_scales(*qkv, grid, config)]
    for label, x, s in zip("qkv", qkv, scales, strict=True):
        want = np.asarray(to_kernel_layout(x, grid, config.tile, pp), np.float32)
        if config.quant == "fp8":
            s = np.repeat(s, pp, axis=2)[..., None] if label != "v" else s[:, :, None, :]
            want = np.clip(want / s, -448.0, 448.0)
        if label == "v":
            want = np.swapaxes(want, 2, 3)
        np.testing.assert_array_equal(interpreted[f"{name}_prepass_{label}"], want, err_msg=label)


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(INTERPRETED)))
def test_interpreted_prepass_kernel_finds_the_one_tile_scales_of_xla(i, interpreted):
    """scale_mode "tile_absmax": the scales `quant.tile_group_scales` gives at group (1, 1, 1),
    bit for bit, and with them the same saturated quotients as the given-scale mode."""
    name, setup, case, seed, _ = INTERPRETED[i]
    config, qkv, _, _, ops, _ = _prepared(setup, case, seed)
    if config.quant != "fp8":
        pytest.skip("unquantized: no scales")
    one_tile = dataclasses.replace(config, q_group=(1, 1, 1), k_group=(1, 1, 1))
    grid, pp = case[0], ops.padded_tile
    scales = kernel_scales(*qkv, grid, one_tile)
    for label, x, s in zip("qk", qkv, scales, strict=False):
        got = interpreted[f"{name}_prepass_{label}_absmax_scales"]
        np.testing.assert_array_equal(got, np.asarray(s), err_msg=label)
        want = np.asarray(to_kernel_layout(x, grid, config.tile, pp), np.float32)
        want = np.clip(want / np.repeat(np.asarray(s), pp, axis=2)[..., None], -448.0, 448.0)
        np.testing.assert_array_equal(interpreted[f"{name}_prepass_{label}_absmax"], want)


@pytest.mark.slow
def test_interpreted_channel_absmax_gives_the_channel_scales_of_xla(interpreted):
    """`channel_absmax` then `quant.safe_scale`: `quant.channel_scales` bit for bit, inf and NaN
    counting as 0 (an all-NaN channel gets scale 1), over several partial token blocks."""
    v = jnp.asarray(_channel_absmax_input())
    got = np.asarray(safe_scale(jnp.asarray(interpreted["channel_absmax"])))
    want = np.asarray(channel_scales(v))[:, 0]
    np.testing.assert_array_equal(got, want)
    assert (want[:, 0, 7] == 1.0).all() and want[1, 2, 3] == np.float32(60000) * np.float32(1 / 448)


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(CASES), len(INTERPRETED)))
def test_interpreted_unquantized_kernel_matches_reference(i, interpreted):
    name, setup, case, seed, _ = INTERPRETED[i]
    config, (q, k, v), scale, _, ops, _ = _prepared(setup, case, seed)
    raw = interpreted[f"{name}_o"]
    assert np.isfinite(raw).all()
    out = output_from_kernel(jnp.asarray(raw), ops)
    ref = reference_attention(q, k, v, grid=case[0], config=config, scale=scale)
    assert _rel(out, ref) < 2e-3


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(INTERPRETED)))
def test_interpreted_backward_matches_float64_gradients(i, interpreted):
    """dQ, dK, dV against float64 NumPy gradients at the quantized Q_hat, K_hat, V_hat.

    Unquantized: fp16 operands and P, dS in fp16 (2^-11 relative each) -> 5e-3. FP8: the kernel's
    delta uses the forward's O, whose P was rounded to E4M3 (~2% of O), and the NumPy reference
    recomputes O exactly; measured ~1% on dQ, dK, so 3% as for the forward. dV has no delta.
    """
    name, setup, case, seed, _ = INTERPRETED[i]
    config, _, scale, info, ops, _ = _prepared(setup, case, seed)
    grid, pp = case[0], ops.padded_tile
    mask = token_mask(grid, config.tile, config.window)
    hats = [np.asarray(x, np.float32) for x in ops.dequantize()]
    hats = [x.astype(np.float16).astype(np.float32) for x in hats]  # the kernel's fp16 inputs
    do = np.asarray(_cotangent(case, seed)).astype(np.float16).astype(np.float32)
    want = dense_gradients(*hats, do, mask, scale)
    valid = np.asarray(ops.key_bias) == 0
    tol = 5e-3 if config.quant == "none" else 0.03
    for grad, w in zip(("dq", "dk", "dv"), want, strict=True):
        raw = interpreted[f"{name}_{grad}"]
        assert np.isfinite(raw).all(), grad  # every element written, padded rows included
        if grad != "dq":  # padded key slots (bias -inf) get exactly zero gradient
            assert not raw[:, :, ~valid].any(), grad
        got = from_kernel_layout(jnp.asarray(raw), grid, config.tile, pp)
        assert _rel(got, w) < (5e-3 if grad == "dv" else tol), grad


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
class TestTritonKernel(KernelBehaviour):
    """The shared kernel suite through jax-triton."""

    impl = "triton"
    differentiable = True

    def kernel(self, ops, info, scale, p_scale, out_dtype):
        args = (ops.q, ops.k, ops.v_t, ops.q_scale, ops.k_scale, ops.v_scale, ops.key_bias)
        blocks = key_block_list(ops.grid, ops.tile, info.window, ops.padded_tile, tf.BLOCK_N)
        fn = lambda *a: tf.fpsa_forward(
            *a, blocks.blocks, blocks.count, padded_tile=ops.padded_tile, scale=scale,
            p_scale=p_scale, out_dtype=out_dtype,
        )  # fmt: skip
        return jax.jit(fn)(*args)


def _jit_triton(grid, config, scale):
    return jax.jit(lambda q, k, v: triton_attention(q, k, v, grid=grid, config=config, scale=scale))


def _grads(fn, q, k, v, do):
    """(dq, dk, dv) of sum(fn(q, k, v) * do)."""
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * do)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("prepass", ["triton", "triton_scales"])
@pytest.mark.parametrize("quant", ["none", "fp8"])
@pytest.mark.parametrize("case", CASES)
def test_triton_prepass_equals_the_xla_prepass(case, quant, prepass):
    """Bit for bit, padded slots included (the poison is NaN): the same E4M3 values (hardware
    round-to-nearest-even cast vs `quant.to_e4m3`'s arithmetic) and the same scales."""
    grid, tile, window, qg, kg, heads, d = case
    config = FPSAConfig(tile=tile, window=window, quant=quant, q_group=qg, k_group=kg)
    q, k, v = _inputs(grid, heads, d, jnp.bfloat16, seed=11)
    v = v * 37.0  # a wider range: some E4M3 subnormals and values near 448 in every channel
    want = quantize_for_kernel(q, k, v, grid, config, block_n=tf.BLOCK_N)
    for _ in range(3):
        jnp.full(want.q.shape, jnp.nan, jnp.float32).block_until_ready()
    got = jax.jit(
        lambda q, k, v: quantize_for_kernel(q, k, v, grid, config, block_n=64, prepass=prepass)
    )(q, k, v)
    for field in ("q", "k", "v_t", "q_scale", "k_scale", "v_scale", "key_bias"):
        g, w = getattr(got, field), getattr(want, field)
        assert g.dtype == w.dtype and g.shape == w.shape, field
        if g.dtype == jnp.float8_e4m3fn:
            g, w = g.view(jnp.uint8), w.view(jnp.uint8)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=field)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_fp8_kernel_writes_every_element_as_emulated(case):
    grid, tile, window, qg, kg, heads, d = case
    config = FPSAConfig(tile=tile, window=window, quant="fp8", q_group=qg, k_group=kg)
    q, k, v = _inputs(grid, heads, d, jnp.bfloat16, seed=4)
    ops = quantize_for_kernel(q, k, v, grid, config, block_n=tf.BLOCK_N)
    # Poison: free a NaN buffer of the output's size so the allocator likely hands it back.
    poison = jnp.full(ops.q.shape, jnp.nan, jnp.float32).block_until_ready()
    del poison
    blocks = _blocks(grid, config, ops)
    raw, lse = tf.fpsa_forward(
        *(ops.q, ops.k, ops.v_t, ops.q_scale, ops.k_scale, ops.v_scale, ops.key_bias),
        blocks.blocks,
        blocks.count,
        padded_tile=ops.padded_tile,
        scale=0.15,
        p_scale=448.0,
        out_dtype=jnp.float32,
    )
    raw, lse = np.asarray(raw), np.asarray(lse)
    assert np.isfinite(raw).all() and np.isfinite(lse).all()
    # Padded query rows too: all of [B, N, Lp, D] must equal the emulation.
    block_m = tf.default_launch(ops.padded_tile).block_m
    want, want_lse = emulate(ops, blocks, 0.15, 448.0, True, block_m)
    assert _rel(raw, want) < 1e-2
    np.testing.assert_allclose(lse, want_lse, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_backward_kernels_write_every_element(case):
    """Raw dQ, dK, dV [B, N, Lp, D] (padded rows too) finite after a NaN poison, padded key rows
    exactly zero, and the gradients within the interpreter test's tolerance of float64."""
    grid, tile, window, qg, kg, heads, d = case
    config = FPSAConfig(tile=tile, window=window, quant="fp8", q_group=qg, k_group=kg)
    q, k, v = _inputs(grid, heads, d, jnp.bfloat16, seed=10)
    scale = 1 / math.sqrt(d)
    info = build_mask_info(grid, tile, window)
    ops = quantize_for_kernel(q, k, v, grid, config, block_n=tf.BLOCK_N)
    pp = ops.padded_tile
    operands = (ops.q, ops.k, ops.v_t, ops.q_scale, ops.k_scale, ops.v_scale, ops.key_bias)
    blocks = _blocks(grid, config, ops)
    o, lse = tf.fpsa_forward(
        *operands,
        blocks.blocks,
        blocks.count,
        padded_tile=pp,
        scale=scale,
        p_scale=448.0,
        out_dtype=jnp.bfloat16,
    )
    do = to_kernel_layout(_cotangent(case, 10), grid, tile, pp)
    delta = jnp.sum(do * o.astype(jnp.float32), axis=-1)
    hats = ops.dequantized(jnp.bfloat16)
    for _ in range(3):  # free NaN buffers of the gradients' size for the allocator to reuse
        jnp.full(ops.q.shape, jnp.nan, jnp.float32).block_until_ready()
    grads = tb.fpsa_backward(
        *hats,
        do.astype(jnp.bfloat16),
        lse,
        delta,
        ops.key_bias,
        info.kv_tiles,
        info.q_tiles,
        info.q_count,
        padded_tile=pp,
        scale=scale,
    )
    valid = np.asarray(ops.key_bias) == 0
    want = dense_gradients(
        *(np.asarray(x, np.float32) for x in ops.dequantize()),
        np.asarray(_cotangent(case, 10)),
        token_mask(grid, tile, window),
        scale,
    )
    for name, raw, w in zip(("dq", "dk", "dv"), grads, want, strict=True):
        raw = np.asarray(raw)
        assert np.isfinite(raw).all(), name
        if name != "dq":
            assert not raw[:, :, ~valid].any(), name
        got = from_kernel_layout(jnp.asarray(raw), grid, tile, pp)
        assert _rel(got, w) < 0.05, name  # bf16 operands, FP8-rounded O in delta


@pytest.mark.gpu
def test_wan_shape_forward_and_gradients_match_xla():
    grid, tile, window = (21, 30, 52), (3, 8, 8), (3, 2, 3)  # 18 of 196 key tiles: 91% sparse
    config = FPSAConfig(tile=tile, window=window, quant="fp8")
    q, k, v = _inputs(grid, 4, 128, jnp.bfloat16, seed=6)
    scale = 1 / math.sqrt(128)
    out = _jit_triton(grid, config, scale)(q, k, v)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    xla = lambda *a: xla_attention(*a, grid=grid, config=config, scale=scale)
    assert _rel(out, jax.jit(xla)(q, k, v)) < 0.03
    do = jax.random.normal(jax.random.key(9), q.shape)
    got = _grads(_jit_triton(grid, config, scale), q, k, v, do)
    want = _grads(xla, q, k, v, do)
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        assert _rel(g, w) < 5e-2, name


@pytest.mark.gpu
def test_wan_model_on_the_kernel_matches_xla_forward_and_gradients():
    """The tiny DiT end to end through impl="triton" against impl="xla".

    Same quantized operands on both paths; they differ by where P is rounded (running vs final
    row max) and bf16 vs float32 inside attention, a few percent through two blocks.
    """
    cfg = WanConfig.preset("tiny")
    config = FPSAConfig(tile=(1, 4, 4), window=(2, 1, 2), quant="fp8")
    params = init_params(cfg, jax.random.key(0))
    params = jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params
    )
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 3, 16, 24, cfg.in_dim)).astype(np.float32)
    t = np.array([500.0], np.float32)
    ctx = rng.standard_normal((1, 7, cfg.text_dim)).astype(np.float32)

    def loss_and_out(params, impl):
        out = WanModel(cfg, attention_impl=impl).apply(
            {"params": params}, latents, t, ctx, attention=config
        )
        return jnp.mean(out**2), out

    results = {}
    for impl in ("triton", "xla"):
        fn = jax.jit(jax.value_and_grad(functools.partial(loss_and_out, impl=impl), has_aux=True))
        (_, out), grads = fn(params)
        results[impl] = (out, jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)]))
    (out, grads), (want_out, want_grads) = results["triton"], results["xla"]
    assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(grads)).all()
    assert _rel(out, want_out) < 3e-2
    assert _rel(grads, want_grads) < 5e-2


def test_kernel_wrappers_reject_bad_tables_and_scales():
    x = jnp.zeros((1, 24, 2, 32), jnp.bfloat16)
    table = np.full(64, -1, np.int32)
    with pytest.raises(ValueError, match="needs scale of shape"):
        tp.relayout(x, None, table, padded_tile=64, scale_mode="tile")
    with pytest.raises(ValueError, match="needs scale of shape"):
        tp.relayout(x, jnp.ones((1, 2, 5)), table, padded_tile=64, scale_mode="channel")
    with pytest.raises(ValueError, match="1-D table"):
        tp.relayout(x, None, table.reshape(1, 64), padded_tile=64, scale_mode="none")
    with pytest.raises(ValueError, match="whole padded tiles"):
        tp.relayout(x, None, table[:32], padded_tile=64, scale_mode="none")
    with pytest.raises(ValueError, match="scale_mode must be"):
        tp.relayout(x, None, table, padded_tile=64, scale_mode="row")
    with pytest.raises(ValueError, match="block_p must be 8, 16, 32 or 64"):
        tp.PrepassLaunch(block_p=48)
    with pytest.raises(ValueError, match="use relayout_with_tile_scales"):
        tp.relayout(x, None, table, padded_tile=64, scale_mode="tile_absmax")
    with pytest.raises(ValueError, match="1-D table"):
        tp.relayout_with_tile_scales(x, table.reshape(1, 64), padded_tile=64)
    with pytest.raises(ValueError, match=r"x must be \[B, L, N, D\]"):
        tp.channel_absmax(x[0])
    with pytest.raises(ValueError, match="block_l must be 4, 8, 16 or 32"):
        tp.channel_absmax(x, block_l=12)
    with pytest.raises(ValueError, match=r"block_l \* unroll divide 512"):
        tp.channel_absmax(x, block_l=32, unroll=32)
    q = jnp.zeros((1, 2, 64, 32), jnp.bfloat16)
    scales = jnp.ones((1, 2, 1)), jnp.ones((1, 2, 1)), jnp.ones((1, 2, 32))
    one = np.zeros((1,), np.int32)
    with pytest.raises(ValueError, match=r"slot_token must be \[Lp\]"):
        tf.fpsa_forward(
            q, q, q, *scales, jnp.zeros(64), np.zeros((1, 1), np.int32), one, padded_tile=64,
            scale=0.1, p_scale=1.0, out_dtype=jnp.bfloat16, slot_token=table[:10],
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"key_blocks must be \[n_tiles=1, M\]"):
        tf.fpsa_forward(
            q, q, q, *scales, jnp.zeros(64), np.zeros((2, 1), np.int32), one, padded_tile=64,
            scale=0.1, p_scale=1.0, out_dtype=jnp.bfloat16,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"block_count must be \[n_tiles=1\]"):
        tf.fpsa_forward(
            q, q, q, *scales, jnp.zeros(64), np.zeros((1, 1), np.int32), one[:0],
            padded_tile=64, scale=0.1, p_scale=1.0, out_dtype=jnp.bfloat16,
        )  # fmt: skip
    with pytest.raises(ValueError, match="prepass must be one of"):
        quantize_for_kernel(
            x, x, x, (1, 4, 6), FPSAConfig(tile=(1, 4, 6)), block_n=64, prepass="tpu"
        )
