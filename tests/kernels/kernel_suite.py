"""The behaviour suite every FPSA kernel backend (pallas, triton, mosaic) inherits.

All three read the same operands (`kernel_layout.quantize_for_kernel`) and tables with the same
argument order, so one suite checks them at two levels:
- the impl, as `fpsa_attention(..., impl=...)` calls it, against `impl="xla"` (same quantization;
  the kernels round P against the running row max, xla against the final one: ~2% relative L2 at
  these shapes, so 3% separates that from real errors, which give O(1)) and against float64 NumPy
  for quant "none" (bf16 operands and output: 1e-2);
- the kernel, on pre-passed operands: every output row and log-sum-exp written (padded rows too),
  padded slots never reaching real rows.
Cases: odd grids, tiles that do not divide them, a window wider than the grid, B > 1, P = 24,
90 and 192 (one, two and three key blocks of 64), and a tile (2, 8, 8) on the grid (3, 5, 6) whose
valid-first slots leave whole key and query blocks of 64 all padding (kernels that skip them must
still give the same outputs and write every row).

A subclass sets `impl`, `head_dim`, `kernel(ops, info, scale, p_scale, out_dtype)` (the backend's
forward on `KernelOperands` with the case's `MaskInfo`, from which it takes the tables it reads,
returning (o [B, N, Lp, D], lse2 [B, N, Lp])) and, when the backend has a backward,
`differentiable = True`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpsa_jax.attention import FPSAConfig, build_mask_info, fpsa_attention
from fpsa_jax.attention.kernel_layout import quantize_for_kernel
from fpsa_jax.attention.tiling import token_mask

# (grid, tile, window, q_group, k_group, batch, heads)
CASES = [
    ((3, 5, 6), (2, 3, 4), (1, 2, 1), (1, 1, 1), (1, 1, 1), 2, 2),  # P 24: edge tiles with holes
    ((4, 9, 10), (3, 8, 8), (1, 1, 2), (1, 1, 1), (2, 2, 2), 1, 1),  # P 192: three key blocks
    ((2, 3, 7), (2, 2, 3), (4, 4, 4), (1, 1, 2), (1, 1, 1), 2, 1),  # window wider than the grid
    ((5, 7, 9), (3, 5, 6), None, (2, 1, 2), (1, 2, 1), 1, 1),  # P 90: two key blocks, dense
    ((3, 5, 6), (2, 8, 8), (2, 1, 1), (1, 1, 1), (1, 1, 1), 2, 1),  # 60 and 30 of 128 slots real
]
CASE_IDS = ["holes", "p192", "wide-window", "p90-dense", "padding-blocks"]


def random_qkv(shape, dtype, seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in keys]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def config_of(case, quant):
    _, tile, window, qg, kg, _, _ = case
    return FPSAConfig(tile=tile, window=window, quant=quant, q_group=qg, k_group=kg)


def numpy_attention(q, k, v, scale, mask):
    """Masked softmax attention in float64; q, k, v [B, L, N, D], mask [L, L]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.where(mask, np.einsum("bqnd,bknd->bnqk", q, k) * scale, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bnqk,bknd->bqnd", p / p.sum(-1, keepdims=True), v)


class KernelBehaviour:
    impl: str
    head_dim: int = 64
    differentiable: bool = False
    block_n: int = 64  # the operand layout's padding multiple for `kernel`
    cases = CASES

    def kernel(self, ops, info, scale, p_scale, out_dtype):
        raise NotImplementedError

    def attention(self, q, k, v, grid, config, scale):
        fn = lambda q, k, v: fpsa_attention(
            q, k, v, grid=grid, config=config, impl=self.impl, scale=scale
        )
        return jax.jit(fn)(q, k, v)

    def inputs(self, case, seed, scale=1.0):
        grid, *_, batch, heads = case
        shape = (batch, math.prod(grid), heads, self.head_dim)
        return [scale * x for x in random_qkv(shape, jnp.bfloat16, seed)]

    def _case(self, index):
        if index >= len(self.cases):
            pytest.skip(f"{type(self).__name__} runs {len(self.cases)} of the cases")
        return self.cases[index]

    @pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
    def test_fp8_matches_xla_up_to_where_p_is_rounded(self, index):
        case = self._case(index)
        grid, config = case[0], config_of(case, "fp8")
        q, k, v = self.inputs(case, seed=1)
        scale = self.head_dim**-0.5
        out = self.attention(q, k, v, grid, config, scale)
        assert out.dtype == jnp.bfloat16 and out.shape == q.shape
        assert np.isfinite(np.asarray(out, np.float32)).all()
        want = fpsa_attention(q, k, v, grid=grid, config=config, impl="xla", scale=scale)
        assert rel_err(out, want) < 0.03

    @pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
    def test_unquantized_matches_float64_masked_softmax(self, index):
        case = self._case(index)
        grid, config = case[0], config_of(case, "none")
        q, k, v = self.inputs(case, seed=2)
        out = self.attention(q, k, v, grid, config, 0.1)
        want = numpy_attention(q, k, v, 0.1, token_mask(grid, config.tile, config.window))
        # bf16 P into the P.V product (2^-9 relative) and a bf16 output (2^-9): under 1e-2.
        assert rel_err(out, want) < 1e-2

    def _operands(self, case, seed, quant="fp8"):
        grid, config = case[0], config_of(case, quant)
        q, k, v = self.inputs(case, seed)
        ops = quantize_for_kernel(q, k, v, grid, config, block_n=self.block_n)
        return ops, build_mask_info(grid, config.tile, config.window)

    def test_every_output_row_and_lse_is_written(self):
        ops, info = self._operands(self._case(0), seed=3)
        for _ in range(3):  # free NaN buffers of the output's size for the allocator to reuse
            jnp.full(ops.q.shape, jnp.nan, jnp.float32).block_until_ready()
        o, lse = self.kernel(ops, info, 0.125, 448.0, jnp.float32)
        assert o.shape == ops.q.shape and lse.shape == ops.q.shape[:3]
        assert np.isfinite(np.asarray(o)).all() and np.isfinite(np.asarray(lse)).all()

    def test_all_padding_blocks_write_zero_rows_or_finite_values(self):
        """The padding-blocks case: every row and lse written (finite after a NaN poison) and
        real rows equal to attention on the dequantized operands in float64."""
        case = self._case(len(CASES) - 1)
        ops, info = self._operands(case, seed=8)
        pad = np.asarray(ops.key_bias).reshape(-1, 64) != 0
        assert pad.all(axis=1).any()  # whole blocks of 64 are padding
        for _ in range(3):
            jnp.full(ops.q.shape, jnp.nan, jnp.float32).block_until_ready()
        o, lse = self.kernel(ops, info, 0.125, 448.0, jnp.float32)
        o, lse = np.asarray(o), np.asarray(lse)
        assert np.isfinite(o).all() and np.isfinite(lse).all()
        real = ~pad.reshape(-1)
        q_hat, k_hat, v_hat = (
            np.asarray(x, np.float64)[:, :, real] for x in ops.dequantized(jnp.float32)
        )  # [B, N, L, D] in slot order; one key tile per query tile's window here: all keys
        s = np.einsum("bnqd,bnkd->bnqk", q_hat, k_hat) * 0.125
        p = np.exp(s - s.max(-1, keepdims=True))
        want = np.einsum("bnqk,bnkd->bnqd", p / p.sum(-1, keepdims=True), v_hat)
        assert rel_err(o[:, :, real], want) < 0.05  # P's E4M3 rounding: ~2%

    def test_padded_slots_never_reach_real_rows(self):
        """Padded slots hold zeros after the pre-pass; a kernel must not rely on it: E4M3's
        largest value (448) there changes no real row's output or log-sum-exp."""
        ops, info = self._operands(self._case(0), seed=4)
        clean_o, clean_lse = self.kernel(ops, info, 0.125, 448.0, jnp.float32)
        pad = np.asarray(ops.key_bias) != 0  # [Lp]
        assert pad.any()
        junk = jnp.asarray(448.0, ops.q.dtype)
        rows = jnp.asarray(pad)[None, None, :, None]
        poisoned = ops.replace(
            q=jnp.where(rows, junk, ops.q),
            k=jnp.where(rows, junk, ops.k),
            v_t=jnp.where(jnp.asarray(pad)[None, None, None, :], junk, ops.v_t),
        )
        o, lse = self.kernel(poisoned, info, 0.125, 448.0, jnp.float32)
        np.testing.assert_array_equal(np.asarray(o)[:, :, ~pad], np.asarray(clean_o)[:, :, ~pad])
        np.testing.assert_array_equal(
            np.asarray(lse)[:, :, ~pad], np.asarray(clean_lse)[:, :, ~pad]
        )

    def test_all_zero_tiles_match_xla(self):
        """Tiles whose Q, K, V are all zero (scale 1, uniform p) next to ordinary ones."""
        case = self._case(0)
        grid, config = case[0], config_of(case, "fp8")
        q, k, v = self.inputs(case, seed=5)
        first = jnp.arange(q.shape[1])[None, :, None, None] < q.shape[1] // 3
        q, k, v = (jnp.where(first, 0, x).astype(jnp.bfloat16) for x in (q, k, v))
        out = self.attention(q, k, v, grid, config, self.head_dim**-0.5)
        want = fpsa_attention(q, k, v, grid=grid, config=config, impl="xla")
        assert rel_err(out, want) < 0.03

    def test_large_inputs_stay_finite_and_within_the_values(self):
        """Inputs of size 1e4 (scores ~1e8 before the softmax scale: rows are nearly one-hot, so
        near-ties make any two implementations differ): outputs are finite convex combinations
        of V rows, |o| <= (1 + 2^-4) max |v| per channel (P's rounding may add 2^-4)."""
        case = self._case(0)
        grid, config = case[0], config_of(case, "fp8")
        q, k, v = self.inputs(case, seed=5, scale=1e4)
        out = np.asarray(self.attention(q, k, v, grid, config, self.head_dim**-0.5), np.float32)
        assert np.isfinite(out).all()
        v_max = np.abs(np.asarray(v, np.float32)).max(axis=1, keepdims=True)
        assert (np.abs(out) <= (1 + 2**-4) * 1.07 * v_max).all()  # 1.07: V's own E4M3 rounding

    @pytest.mark.parametrize("quant", ["none", "fp8"])
    @pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
    def test_gradients_match_xla(self, index, quant):
        """jax.grad through the kernel against jax.grad through impl="xla" (straight-through
        FP8). Unquantized: both bf16, 2e-2. FP8: the xla path's dV uses the E4M3-rounded P (its
        straight-through estimate), the kernel's the unrounded P, at different maxima: 5e-2."""
        if not self.differentiable:
            pytest.skip(f"impl={self.impl!r} has no backward")
        case = self._case(index)
        grid, config = case[0], config_of(case, quant)
        q, k, v = self.inputs(case, seed=6)
        do = jax.random.normal(jax.random.key(7), q.shape)

        def grads(impl):
            def loss(q, k, v):
                o = fpsa_attention(q, k, v, grid=grid, config=config, impl=impl)
                return jnp.sum(o.astype(jnp.float32) * do)

            return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

        for name, g, w in zip(("dq", "dk", "dv"), grads(self.impl), grads("xla"), strict=True):
            assert g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all(), name
            assert rel_err(g, w) < (2e-2 if quant == "none" else 5e-2), name
