"""The Hopper FP8 block-sparse FPSA attention forward: a Triton kernel called through jax-triton.

Layout (from `fp8_prepass.quantize_for_kernel`): Q, K [B, N, Lp, D] and V^T [B, N, D, Lp], tile
major, every tile padded from P to Pp slots (a multiple of BLOCK_N). One program computes BLOCK_M
query rows of one query tile for one (batch, head): grid (n_tiles * Pp / BLOCK_M, B * N). It walks
the tile's `kv_count` key tiles from the int32 table `kv_tiles` [n_tiles, kv_count], each in Pp /
BLOCK_N key blocks, with an online softmax:

  s2 = (Q8 . K8^T) * (q_scale[u] * k_scale[v] * softmax_scale * log2(e)) + key_bias   (float32)
  m = running row max of s2;  p = exp2(s2 - m) in (0, 1];  l += sum(p)  (unrounded, as reference)
  acc = acc * exp2(m_old - m) + e4m3(p * p_scale) . V8          (FP8 wgmma, float32 accumulate)
  o = acc / (l * p_scale) * v_scale  per channel,  written in q's dtype.

So the scales are folded: one scalar per (query tile, key tile) pair multiplies the scores (it
carries log2(e) so the kernel uses exp2), and the per-channel V scale and 1 / p_scale are applied
once at the end. P is rounded against the running max (DESIGN.md section 3 allows it). Padded key
slots get a -inf bias; the running max starts at a finite -1e30 so a fully padded key block gives
p = 0 and alpha = 1, never NaN. Padded query rows compute finite garbage that is dropped.

Block shapes: BLOCK_N = 64 key slots (the k extent of the P.V dot; FP8 wgmma needs >= 32).
BLOCK_M = 128 (8 warps) when Pp is a multiple of 128, else 64 (4 warps): a query block must stay
inside one tile, since tiles have different key lists. Wan's tile (3, 8, 8) has P = Pp = 192, so
it runs BLOCK_M = 64; tiles whose volume is not a multiple of 64 are padded up to one (wasted work
of (Pp - P) / Pp). D must be a power of two (16..256).

quant="none" runs the same kernel on bf16/fp16 operands (P cast to the input dtype, as the
reference does for 16-bit inputs); float32 inputs with quant="none" raise.

Forward only: `triton_attention` is a `jax.custom_vjp` whose backward raises.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax.attention.config import FPSAConfig
from fpsa_jax.attention.mask import build_mask_info
from pallas_kernels.fp8_prepass import output_from_kernel, quantize_for_kernel

LOG2_E = 1.4426950408889634
BLOCK_N = 64
NUM_STAGES = 3


def block_sizes(padded_tile: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for a padded tile length Pp (a multiple of BLOCK_N)."""
    if padded_tile % 128 == 0:
        return 128, BLOCK_N, 8
    return 64, BLOCK_N, 4


def make_kernel():
    """Builds the Triton kernel (imports Triton here, so importing this module needs no Triton).

    Under TRITON_INTERPRET=1 this returns Triton's CPU interpreter version (tests use it).
    """
    import triton
    import triton.language as tl

    @triton.jit
    def fpsa_fwd_kernel(
        q_ptr,  # [B, N, Lp, D] fp8 (or bf16/fp16)
        k_ptr,  # [B, N, Lp, D]
        vt_ptr,  # [B, N, D, Lp]
        q_scale_ptr,  # f32 [B, N, n_tiles]
        k_scale_ptr,  # f32 [B, N, n_tiles]
        v_scale_ptr,  # f32 [B, N, D]
        key_bias_ptr,  # f32 [n_tiles * Pp]: 0 (real slot) or -inf (padding)
        kv_tiles_ptr,  # i32 [n_tiles, KV_COUNT]
        o_ptr,  # [B, N, Lp, D], q's dtype
        N_TILES: tl.constexpr,
        PP: tl.constexpr,
        KV_COUNT: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        QK_SCALE: tl.constexpr,  # softmax scale * log2(e)
        P_SCALE: tl.constexpr,  # static scale of P before its cast (448 for FP8, 1 otherwise)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        EMULATE_FP8_P: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        q_blocks: tl.constexpr = PP // BLOCK_M
        k_blocks: tl.constexpr = PP // BLOCK_N
        seq: tl.constexpr = N_TILES * PP
        q_tile = pid_m // q_blocks
        row0 = q_tile * PP + (pid_m % q_blocks) * BLOCK_M

        bh64 = bh.to(tl.int64)
        qk_base = bh64 * seq * HEAD_DIM
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)

        q = tl.load(q_ptr + qk_base + (row0 + offs_m)[:, None] * HEAD_DIM + offs_d[None, :])
        q_scale = tl.load(q_scale_ptr + bh * N_TILES + q_tile) * QK_SCALE

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        p_dtype = vt_ptr.dtype.element_ty

        for j in range(0, KV_COUNT * k_blocks):
            kv_tile = tl.load(kv_tiles_ptr + q_tile * KV_COUNT + j // k_blocks)
            col0 = kv_tile * PP + (j % k_blocks) * BLOCK_N
            cols = col0 + offs_n
            k = tl.load(k_ptr + qk_base + cols[:, None] * HEAD_DIM + offs_d[None, :])
            # V^T block [D, BLOCK_N]: contiguous along the keys, the k dim of the P.V dot.
            vt = tl.load(vt_ptr + qk_base + offs_d[:, None] * seq + cols[None, :])
            pair_scale = q_scale * tl.load(k_scale_ptr + bh * N_TILES + kv_tile)
            bias = tl.load(key_bias_ptr + cols)

            s = tl.dot(q, tl.trans(k)) * pair_scale + bias[None, :]
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if EMULATE_FP8_P:
                # Triton 3.6's interpreter mis-rounds float32 -> fp8 casts (subnormals flushed,
                # carries into the exponent lost), so CPU tests round P to E4M3 in float32 here:
                # subnormals (x < 2^-6) have quantum 2^-9, which adding 2^14 leaves; normals keep
                # 3 of 23 mantissa bits, rounded to nearest even. Valid for 0 <= x <= 448.
                x = p * P_SCALE
                bits = x.to(tl.int32, bitcast=True)
                bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
                x = tl.where(
                    x < 0.015625, (x + 16384.0) - 16384.0, bits.to(tl.float32, bitcast=True)
                )
                acc = tl.dot(x, tl.trans(vt).to(tl.float32), acc)
            else:
                # Hopper's FP8 wgmma accumulates with reduced precision; Triton's default on
                # sm_90 never promotes, so a running accumulator drifts (measured: outputs 4%
                # too small at 54 key blocks). Promote to float32 once per key block.
                acc = tl.dot(
                    (p * P_SCALE).to(p_dtype), tl.trans(vt), acc, max_num_imprecise_acc=BLOCK_N
                )
            m_i = m_new

        v_scale = tl.load(v_scale_ptr + bh * HEAD_DIM + offs_d)
        o = acc * (1.0 / (l_i * P_SCALE))[:, None] * v_scale[None, :]
        o_ptrs = o_ptr + qk_base + (row0 + offs_m)[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty))

    return fpsa_fwd_kernel


_kernel = functools.cache(make_kernel)


def kernel_params(ops, kv_count: int, scale: float, p_scale: float, emulate_p=False) -> dict:
    """The kernel's constexpr arguments and launch shape for pre-passed operands `ops`.

    `emulate_p` rounds P in float32 instead of casting it to FP8 (interpreter tests only).
    """
    b, n_heads, seq, d = ops.q.shape
    block_m, block_n, num_warps = block_sizes(ops.padded_tile)
    meta = dict(
        N_TILES=seq // ops.padded_tile,
        PP=ops.padded_tile,
        KV_COUNT=kv_count,
        HEAD_DIM=d,
        QK_SCALE=float(scale) * LOG2_E,
        P_SCALE=float(p_scale),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        EMULATE_FP8_P=bool(emulate_p),
    )
    return dict(meta=meta, grid=(seq // block_m, b * n_heads), num_warps=num_warps)


def _check(q, config: FPSAConfig | None) -> None:
    if config is None:
        raise ValueError(
            "impl='triton' needs an FPSAConfig (its tile sets the kernel layout); for dense "
            "unquantized attention use impl='cudnn' or impl='xla'."
        )
    if config.quant == "none" and q.dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise NotImplementedError(
            f"impl='triton' with quant='none' runs 16-bit operands only, got {q.dtype}; use "
            f"quant='fp8', bf16/fp16 inputs, or impl='xla'."
        )
    d = q.shape[-1]
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"impl='triton' needs a power-of-two head dim D in [16, 256], got {d}")


def launch_kernel(ops, kv_tiles: np.ndarray, *, scale: float, p_scale: float, out_dtype):
    """Runs the kernel on pre-passed operands: the raw output [B, N, Lp, D] (padded rows too)."""
    import jax_triton as jt

    launch = kernel_params(ops, kv_tiles.shape[1], scale, p_scale)
    return jt.triton_call(
        ops.q,
        ops.k,
        ops.v_t,
        ops.q_scale,
        ops.k_scale,
        ops.v_scale,
        ops.key_bias,
        jnp.asarray(np.ascontiguousarray(kv_tiles, dtype=np.int32)),
        kernel=_kernel(),
        out_shape=jax.ShapeDtypeStruct(ops.q.shape, out_dtype),
        grid=launch["grid"],
        num_warps=launch["num_warps"],
        num_stages=NUM_STAGES,
        name="fpsa_fwd",
        **launch["meta"],
    )


def _forward(q, k, v, grid, config: FPSAConfig, scale: float) -> jax.Array:
    info = build_mask_info(grid, config.tile, config.window)
    ops = quantize_for_kernel(q, k, v, grid, config, block_n=BLOCK_N)
    p_scale = config.scale if config.quant == "fp8" else 1.0
    o = launch_kernel(ops, info.kv_tiles, scale=scale, p_scale=p_scale, out_dtype=q.dtype)
    return output_from_kernel(o, ops)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attention(q, k, v, grid, config, scale):
    return _forward(q, k, v, grid, config, scale)


def _attention_fwd(q, k, v, grid, config, scale):
    return _forward(q, k, v, grid, config, scale), None


def _attention_bwd(grid, config, scale, residuals, g):
    raise NotImplementedError(
        "impl='triton': the block-sparse backward is not built yet; use impl='xla' for training."
    )


_attention.defvjp(_attention_fwd, _attention_bwd)


def _require_hopper() -> None:
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if jax.default_backend() != "gpu" or capability is None or float(capability) < 9.0:
        raise ValueError(
            f"impl='triton' needs an NVIDIA Hopper GPU (compute capability >= 9.0 for FP8 "
            f"wgmma); this process runs on {device.device_kind} ({jax.default_backend()}). Use "
            f"impl='xla' (any backend) or impl='pallas' (runs interpreted on CPU)."
        )
    try:
        import jax_triton  # noqa: F401
    except ImportError as e:
        raise ValueError("impl='triton' needs jax-triton 0.3.1: pip install 'fpsa-jax[gpu]'") from e


def triton_attention(q, k, v, *, grid, config: FPSAConfig | None, scale) -> jax.Array:
    """FPSA attention with the Triton kernel (forward only). q, k, v: [B, L, N, D] -> [B, L, N, D].

    Needs a Hopper GPU and jax-triton. `config.window` None means every key tile. Gradients raise
    NotImplementedError.
    """
    _check(q, config)
    grid = tuple(int(g) for g in grid)
    if math.prod(grid) != q.shape[1]:
        raise ValueError(f"grid {grid} has {math.prod(grid)} tokens but L = {q.shape[1]}")
    _require_hopper()
    return _attention(q, k, v, grid, config, float(scale))
