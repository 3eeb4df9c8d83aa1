"""Block-sparse flash-attention forward over 3D tiles, FP8 (E4M3) or 16-bit: a Pallas Mosaic GPU
kernel for Hopper (sm_90), warp-specialized.

Arrays only: the same operands, int32 table and argument order as `triton_fpsa_fwd.fpsa_forward`
(`fpsa_jax.attention.kernel_layout` builds them, `fpsa_jax.attention.mosaic` wraps the kernel).

Layout: Q, K [B, N, Lp, D] and V^T [B, N, D, Lp], tile major, every tile padded from P to Pp slots
(a multiple of 64); q_scale, k_scale float32 [B, N, n_tiles]; v_scale float32 [B, N, D];
key_bias float32 [Lp] (0 real slot, -inf padding); key_blocks int32 [n_tiles, M] and block_count
int32 [n_tiles] (`kernel_layout.key_block_list` with 64-slot blocks: per query tile, the key
blocks holding a real token, -1 padded); optionally valid_slots int32 [Lp / 64], the real slots
of each key block, which lead it (`kernel_layout.key_block_valid_slots`): with it the kernel masks
a block's trailing padding columns instead of reading the key bias at every step.

A CTA computes one query tile of one (batch, head) at a time (an item: grid (n_tiles, N, B), or
by default one persistent CTA per SM walking many items, see Schedules), with Pp / 64 consumer
warpgroups of 64 query rows each (one wgmma M) and one producer warpgroup:
- the producer (few registers) walks the query tile's block_count key blocks of 64 slots (a
  dynamic trip count: all-padding blocks at the end of edge tiles are not in the list) and
  TMA-copies K [64, D] and V^T [D, 64] of each block into a `stages`-deep SMEM ring,
  each slot guarded by a "full" barrier (TMA arrival) and an "empty" one (every consumer arrives
  when it has read the slot);
- each consumer runs the online softmax in base 2 over the same key blocks:

    s2 = (Q8 . K8^T) * (q_scale[u] * k_scale[v] * softmax_scale * log2 e) + key_bias  (FP8 wgmma)
    m = running row max;  c = m - log2(p_scale) (while |m| < 2^20, else m);  p' = exp2(s2 - c)
    l' = alpha * l' + sum(p')  (unrounded);  acc = alpha * acc + e4m3(p') . V8   (FP8 wgmma)
    o = acc / l' * v_scale per channel;  lse2 = c + log2(l'),  alpha = exp2(c_old - c)

  so P is rounded to E4M3 against the running max (DESIGN.md section 3), and P's static scale
  rides in the exponent at no cost per element. The guard keeps that exact where it matters:
  float32 holds m - log2(p_scale) to within 0.05 only while |m| < 2^20; beyond (inputs of size
  1e4 give |m| ~ 1e9, ulp 64) p' would overflow E4M3, so such rows round p' in (0, 1] instead
  (their softmax is one-hot by then). P goes to the second wgmma from registers (on the GPU,
  `MosaicLaunch.p_in_registers`: for FP8 two warp shuffles regroup the f32 accumulator layout
  into the 8-bit operand layout, which Mosaic GPU has no relayout for; 16-bit P is already in
  its operand layout) or through SMEM (the interpreter). V^T makes V K-major, as FP8 wgmma
  needs.
- the output leaves in token order [B, L, N, D], each row stored from registers at its token
  (`slot_token`, padding rows skipped), or through SMEM by TMA in the kernel layout [B, N, Lp,
  D] (padded rows hold finite values) without the table; lse2 float32 [B, N, Lp] for the
  backward either way.

The running max starts at a finite -1e30 so that a key block of padding only gives p = 0 and
alpha = 1, never NaN. 16-bit operands run the same kernel with P cast to their dtype (p_scale 1).

Slots are valid first inside each tile (`kernel_layout`), so the padding of an edge tile fills
whole key blocks at its end, and those blocks are not in key_blocks: like the Triton forward,
this kernel computes only blocks holding a real token. A consumer whose 64 query rows are all
padding (`MosaicLaunch.skip_padding_rows`) computes nothing but still waits on and releases every
ring slot, since the "empty" barriers count every consumer's arrival.

Schedules (`MosaicLaunch`): by default each consumer runs its steps on its own; `pingpong` makes
the consumers take turns issuing their wgmmas (step j's Q.K^T with step j - 1's P.V), so that one
consumer's softmax overlaps the others' products on the tensor cores; `lazy_rescale` skips the
accumulator's multiplication by alpha in warps where no row's max moved; `persistent_ctas`
launches one wave of CTAs that each walk many (tile, head, batch) items, a share balanced on the
host by key blocks times computing consumers, through one K/V ring and one turn ring, the last
consumer's final hand-over of an item being the next item's first turn. `default_launch` is
the fastest measured combination: ping-pong, lazy rescale, P from registers, padding consumers
skipped and one persistent CTA per SM.

`interpret=True` runs the kernel in Mosaic GPU's interpreter (CPU): the CI tests use it. There the
P.V product goes to a fresh accumulator that is then added (the interpreter cannot run an
accumulator initialised from registers); on the GPU it accumulates in place. The interpreter runs
each warpgroup as its own CPU computation, and they wait for each other at barriers, in host
callbacks that hold threads of XLA's CPU pool (one per core unless PJRT_NPROC says otherwise):
with too few threads every one of them can end up waiting, so `fpsa_forward` warns where the
pool is smaller than the warpgroups plus two (the tests set PJRT_NPROC=8).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, memref, nvvm, scf, vector
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2_E = 1.4426950408889634
BLOCK_Q = 64  # query rows per consumer warpgroup: one wgmma M
BLOCK_KV = 64  # key slots per pipeline step
MAX_CONSUMERS = 3  # Pp <= 192: four warpgroups are 512 threads, the register file's limit here
HEAD_DIMS = (64, 128, 256)

HOPPER_SMS = 132  # H100 / H200 SXM
SMEM_BYTES = 227 * 1024  # per block on sm_90, less the 1 KB the driver reserves
# What Mosaic GPU allocates beyond the buffers `smem_bytes` counts (barriers, alignment): 2.6 KB
# in a build with 38 barriers and 224.75 KB of buffers (232,752 bytes allocated).
SMEM_OVERHEAD = 4096

_ROW = plgpu.Layout.WGMMA.reduce(1)
_COL = plgpu.Layout.WGMMA.reduce(0)


@dataclasses.dataclass(frozen=True)
class MosaicLaunch:
    """Pipeline depth and register split of the forward.

    Attributes:
      stages: K/V ring slots in SMEM (>= 2).
      consumer_registers, producer_registers: `setmaxnreg` targets per thread (multiples of 8;
        None leaves ptxas' allocation). The sum over warpgroups must fit 64K registers.
      prefetch: load step j + 1's key tile, K scale and key bias during step j, so that their
        global loads leave the critical path (they cannot be hoisted above a barrier wait).
      pipeline: issue step j + 1's Q.K^T wgmma before step j's softmax, so the tensor cores work
        while the warpgroup exponentiates (FlashAttention-3's intra-warpgroup overlap).
      p_in_registers: hand P to the P.V wgmma from registers instead of a round trip through
        SMEM and an async-proxy fence (and no P buffer in SMEM): FP8 P is regrouped from the
        accumulator layout into the 8-bit operand layout with two warp shuffles per register;
        16-bit P is in its operand layout as it is. Not for the interpreter.
      lazy_rescale: multiply the accumulator by alpha only in warps where some row's max moved
        (alpha != 1); elsewhere the multiplication by 1 is skipped (same values). Not for the
        interpreter.
      pingpong: the consumer warpgroups take turns issuing their wgmmas (a ring of "turn"
        barriers): each issues step j's Q.K^T and step j - 1's P.V back to back, passes the turn
        on, then runs step j's softmax while the next consumer's products occupy the tensor
        cores (FlashAttention-3's inter-warpgroup ping-pong). Excludes `pipeline`.
      skip_padding_rows: a consumer whose 64 query rows are all padding (the end of an edge
        tile) computes nothing; it only waits on and releases the ring's slots (and takes its
        turns) so that the barrier counts stay static, and writes lse 0 (zero rows in the
        kernel layout).
      persistent_ctas: None launches one CTA per (query tile, head, batch). An int G launches
        min(G, items) CTAs (the SM count: one wave) that each walk a balanced share of the
        items (`item_schedule`) with one K/V ring through all of them, so the producer loads
        the next item's first blocks while the consumers finish the current one (its last
        products, the output store), instead of a new CTA starting from an empty ring.
    """

    stages: int = 4
    consumer_registers: int | None = 160
    producer_registers: int | None = 24
    prefetch: bool = True
    pipeline: bool = False
    p_in_registers: bool = False
    lazy_rescale: bool = False
    pingpong: bool = False
    skip_padding_rows: bool = False
    persistent_ctas: int | None = None


def smem_bytes(
    launch: MosaicLaunch,
    padded_tile: int,
    head_dim: int,
    dtype,
    out_dtype,
    *,
    token_order: bool = False,
) -> int:
    """SMEM the kernel takes: Q, the K/V ring, P (unless it stays in registers), lse staging,
    the output staging (only for the kernel-layout store; the token-order store writes from
    registers), and SMEM_OVERHEAD."""
    consumers = padded_tile // BLOCK_Q
    item, out_item = jnp.dtype(dtype).itemsize, jnp.dtype(out_dtype).itemsize
    rows = consumers * BLOCK_Q
    ring = launch.stages * 2 * BLOCK_KV * head_dim * item
    p = 0 if launch.p_in_registers else rows * BLOCK_KV * item
    out = 0 if token_order else rows * head_dim * out_item
    return rows * head_dim * item + ring + p + out + rows * 4 + SMEM_OVERHEAD


def xla_cpu_pool_threads() -> int:
    """The threads of XLA's CPU pool as the CPU client sizes it: PJRT_NPROC, else NPROC, else
    one per schedulable CPU."""
    for name in ("PJRT_NPROC", "NPROC"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def warn_if_interpreter_may_deadlock(warpgroups: int) -> None:
    """Warns where Mosaic GPU's interpreter can hang (see the module docstring): a launch can
    hold a pool thread in a barrier wait of each of its `warpgroups` warpgroups and one in its
    own callback; one thread more is margin. Seen with a pool of 2 threads: about one
    interpreted launch of four warpgroups in fifty never returned."""
    threads = xla_cpu_pool_threads()
    if threads < warpgroups + 2:
        warnings.warn(
            f"Mosaic GPU's interpreter runs this kernel's {warpgroups} warpgroups as CPU "
            f"computations that wait for each other, and XLA's CPU pool has {threads} threads "
            f"here: it can deadlock. Set PJRT_NPROC={warpgroups + 2} (or more) before JAX starts.",
            RuntimeWarning,
            stacklevel=3,
        )


def sm_count() -> int:
    """The first GPU's SM count (one persistent CTA each); off a GPU, the H100 / H200's 132."""
    try:
        return jax.devices("gpu")[0].core_count
    except RuntimeError:  # no GPU backend
        return HOPPER_SMS


def item_schedule(cost: np.ndarray, ctas: int) -> tuple[np.ndarray, np.ndarray]:
    """Which persistent CTA computes which items, and in what order.

    The items, costliest first, each go to the CTA with the least work so far (LPT), so the
    last CTA to finish is at most one item behind the mean; each CTA then walks its share in
    id order, so that the CTAs in flight stay near each other in the tile order and share key
    blocks in L2. (At 720p 90% the round robin cta, cta + G, ... left the busiest CTA 8% above
    the mean, since edge tiles have fewer blocks and fewer consumers; benchmarks/RESULTS.md,
    session 18.)

    Args:
      cost: [items] the work of each (query tile, head, batch) item, tiles fastest.
      ctas: the number of CTAs, 1 <= ctas <= items.

    Returns:
      (order int32 [items], start int32 [ctas + 1]): CTA c computes the items order[start[c]],
      ..., order[start[c + 1] - 1] (at least one), ids increasing.
    """
    cost = np.asarray(cost)
    items = len(cost)
    if not 1 <= ctas <= items:
        raise ValueError(f"need 1 <= ctas <= items, got {ctas} CTAs for {items} items")
    owner = np.empty(items, np.int64)
    loads = [(0, c) for c in range(ctas)]  # a heap of (work so far, cta)
    for w in np.argsort(-cost, kind="stable"):
        load, c = heapq.heappop(loads)
        owner[w] = c
        heapq.heappush(loads, (load + int(cost[w]), c))
    order = np.argsort(owner, kind="stable").astype(np.int32)  # by CTA, ids increasing
    start = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=ctas))]).astype(np.int32)
    return order, start


def default_launch(
    padded_tile: int, head_dim: int, dtype, out_dtype, *, interpret: bool = False
) -> MosaicLaunch:
    """The fastest measured schedule (benchmarks/RESULTS.md, sessions 12 and 18: ping-pong, lazy
    rescale, P from registers, padding consumers skipped, one persistent CTA per SM), with four
    ring slots where they fit in SMEM (FP8 at D = 128 does), else as many as fit. The
    interpreter gets the same schedule without the inline Mosaic GPU code it cannot run, and
    one CTA per item (the persistent walk has its own interpreter tests)."""
    tuned = dict(pingpong=True, skip_padding_rows=True)
    if not interpret:
        tuned.update(lazy_rescale=True, p_in_registers=True, persistent_ctas=sm_count())
    for stages in (4, 3, 2):
        launch = MosaicLaunch(stages=stages, **tuned)
        if smem_bytes(launch, padded_tile, head_dim, dtype, out_dtype) <= SMEM_BYTES:
            return launch
    return MosaicLaunch(stages=2, **tuned)  # fpsa_forward reports that it does not fit


def _smem(shape, dtype):
    """SMEM scratch tiled and swizzled for TMA and wgmma (minor dim = one swizzle row)."""
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = min(128, shape[-1] * bits // 8)
    tiling = plgpu.TilingTransform((8, swizzle * 8 // bits))
    return plgpu.SMEM(shape, dtype, transforms=(tiling, plgpu.SwizzleTransform(swizzle)))


def _fp8_operand_from_accumulator():
    """A function of P [64, 64] float32 in the wgmma accumulator layout returning E4M3 P in the
    8-bit wgmma operand layout (`WGMMA_8BIT`), for P.V with P from registers.

    Lane (row r, column group c = lane % 4) of the accumulator layout holds, in each 8-column
    tile, columns 2c and 2c + 1; in the 8-bit operand layout it must hold columns 4c .. 4c + 3 of
    each 16-column tile. So each 16-column tile's two E4M3 pairs are packed in one 32-bit word,
    lane c reads the words of lanes 2c % 4 and (2c + 1) % 4 of its row (two `shfl.idx`), and keeps
    their first halves (c < 2) or second halves (c >= 2) (one `prmt`).
    """

    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA,),
        return_type=plgpu.ShapeDtypeStruct(
            (BLOCK_Q, BLOCK_KV), jnp.float8_e4m3fn, layout=plgpu.Layout.WGMMA_8BIT
        ),
    )
    def convert(_, p):
        i32 = ir.IntegerType.get_signless(32)
        f8 = ir.Float8E4M3FNType.get()
        const = lambda x: arith.constant(i32, x)
        p8 = p.astype(f8)
        lane = arith.remui(mgpu.utils.thread_idx(), const(32))
        quad = arith.andi(lane, const(-4))
        c = arith.andi(lane, const(3))
        first = arith.addi(quad, arith.andi(arith.muli(c, const(2)), const(3)))
        second = arith.addi(
            quad, arith.andi(arith.addi(arith.muli(c, const(2)), const(1)), const(3))
        )
        low_half = arith.cmpi(arith.CmpIPredicate.ult, c, const(2))
        perm = arith.select(low_half, const(0x5410), const(0x7632))
        regs = p8.registers  # [1, 8, 1, 1, 2, 1, 1, 1, 1] of vector<2 x f8>: (8-col tile, row half)
        out = np.empty(mgpu.WGMMA_LAYOUT_8BIT.registers_shape((BLOCK_Q, BLOCK_KV)), dtype=object)
        vec4 = ir.VectorType.get((4,), f8)
        for t16 in range(BLOCK_KV // 16):
            for half in range(2):
                a = regs[0, 2 * t16, 0, 0, half, 0, 0, 0, 0]
                b = regs[0, 2 * t16 + 1, 0, 0, half, 0, 0, 0, 0]
                word = mgpu.utils.bitcast(mgpu.utils.vector_concat([a, b]), i32)
                full = const(-1)
                clamp = const(0x1F)
                x = nvvm.shfl_sync(full, word, first, clamp, nvvm.ShflKind.idx)
                y = nvvm.shfl_sync(full, word, second, clamp, nvvm.ShflKind.idx)
                picked = mgpu.utils.prmt(x, y, perm)
                out[0, t16, 0, 0, half, 0, 0, 0, 0] = mgpu.utils.bitcast(picked, vec4)
        return mgpu.FragmentedArray(_registers=out, _layout=mgpu.WGMMA_LAYOUT_8BIT, _is_signed=None)

    return convert


def _registers_by_row(array) -> list[list[tuple]]:
    """The registers of a WGMMA-layout array grouped by the row they hold: a list (one entry per
    row this thread holds) of [(register, (row index, column index)), ...]."""
    from_rows = array.layout.tiling.tile_dimension(0)  # which register-array dims pick the row
    groups: dict[tuple, list] = {}
    registers = np.ndindex(array.registers.shape)
    for reg_idx, idx in zip(registers, array.layout.thread_idxs(array.shape), strict=True):
        key = tuple(i for i, is_row in zip(reg_idx, from_rows, strict=True) if is_row)
        groups.setdefault(key, []).append((array.registers[reg_idx], idx))
    return list(groups.values())


def _store_rows_by_token():
    """A function of (out [64, D] in the WGMMA layout, o_rows: the [L, D] GMEM ref of one
    (batch, head), tokens: int32 [64] GMEM ref, the token of each row or -1) that stores each row
    at its token, straight from registers, and skips padding rows: the output leaves the kernel
    in token order (no reorder pass after it). One token load and one branch per row a thread
    holds (two), then its 4-byte register pairs."""

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType(), plgpu.RefType()))
    def store(_, out, o_rows, tokens):
        index = ir.IndexType.get()
        zero = arith.constant(ir.IntegerType.get_signless(32), 0)
        for members in _registers_by_row(out):
            row = members[0][1][0]
            token = memref.load(tokens, [row])
            branch = scf.IfOp(arith.cmpi(arith.CmpIPredicate.sge, token, zero))
            with ir.InsertionPoint(branch.then_block):
                at = arith.index_cast(index, token)
                for register, (_, col) in members:
                    vector.store(register, o_rows, [at, col])
                scf.yield_([])

    return store


def _rescale_where_needed(head_dim: int):
    """A function of (acc [64, D] float32, alpha broadcast to [64, D], both in the WGMMA layout)
    returning acc * alpha, computed only in warps where some row's alpha is not 1 (a warp-wide
    vote on the two rows each thread holds); other warps return acc as it is, which is the same
    value (online softmax: alpha = 1 exactly when a row's max did not move)."""
    acc_type = plgpu.ShapeDtypeStruct((BLOCK_Q, head_dim), jnp.float32, layout=plgpu.Layout.WGMMA)

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.Layout.WGMMA), return_type=acc_type)
    def rescale(_, acc, alpha):
        i1, i32 = ir.IntegerType.get_signless(1), ir.IntegerType.get_signless(32)
        f32 = ir.F32Type.get()
        one = arith.constant(f32, 1.0)
        moved = arith.constant(i1, 0)
        for members in _registers_by_row(alpha):
            value = vector.extract(
                members[0][0], dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([0])
            )
            moved = arith.ori(moved, arith.cmpf(arith.CmpFPredicate.UNE, value, one))
        full = arith.constant(i32, -1)
        moved = nvvm.vote_sync(full, moved, nvvm.VoteSyncKind.any, results=[i1])
        registers = list(acc.registers.flat)
        branch = scf.IfOp(moved, [r.type for r in registers], has_else=True)
        with ir.InsertionPoint(branch.then_block):
            pairs = zip(registers, alpha.registers.flat, strict=True)
            scaled = [arith.mulf(r, a) for r, a in pairs]
            scf.yield_(scaled)
        with ir.InsertionPoint(branch.else_block):
            scf.yield_(registers)
        out = np.empty(acc.registers.shape, dtype=object)
        out.flat[:] = list(branch.results)
        return mgpu.FragmentedArray(_registers=out, _layout=acc.layout, _is_signed=None)

    return rescale


def check_operands(
    q, k, v_t, q_scale, k_scale, v_scale, key_bias, key_blocks, block_count, padded_tile: int
):
    """Raises ValueError naming the operand whose shape or dtype the kernel cannot take."""
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q, k must be [B, N, Lp, D] alike, got {q.shape}, {k.shape}")
    b, n, lp, d = q.shape
    if v_t.shape != (b, n, d, lp):
        raise ValueError(f"v_t must be [B, N, D, Lp] = {(b, n, d, lp)}, got {v_t.shape}")
    if not q.dtype == k.dtype == v_t.dtype:
        raise ValueError(f"q, k, v_t must share a dtype, got {q.dtype}, {k.dtype}, {v_t.dtype}")
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"the Mosaic kernel takes float8_e4m3fn or bfloat16 values, got {q.dtype}")
    if d not in HEAD_DIMS:
        raise ValueError(f"the Mosaic kernel needs head dim D in {HEAD_DIMS}, got {d}")
    if padded_tile % BLOCK_KV or not BLOCK_Q <= padded_tile <= MAX_CONSUMERS * BLOCK_Q:
        raise ValueError(
            f"the Mosaic kernel needs a padded tile Pp in 64, 128 or 192 slots (tiles of up to "
            f"{MAX_CONSUMERS * BLOCK_Q} tokens), got {padded_tile}"
        )
    if lp % padded_tile:
        raise ValueError(f"Lp = {lp} is not a whole number of padded tiles of {padded_tile}")
    n_tiles = lp // padded_tile
    for name, x, want in (
        ("q_scale", q_scale, (b, n, n_tiles)),
        ("k_scale", k_scale, (b, n, n_tiles)),
        ("v_scale", v_scale, (b, n, d)),
        ("key_bias", key_bias, (lp,)),
    ):
        if tuple(x.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if np.ndim(key_blocks) != 2 or np.shape(key_blocks)[0] != n_tiles:
        raise ValueError(f"key_blocks must be [n_tiles={n_tiles}, M], got {np.shape(key_blocks)}")
    count = np.asarray(block_count)
    if count.shape != (n_tiles,) or count.min() < 1 or count.max() > np.shape(key_blocks)[1]:
        raise ValueError(
            f"block_count must be [n_tiles={n_tiles}] with entries in 1..{np.shape(key_blocks)[1]} "
            f"(a query tile's own tile always has a real block), got shape {count.shape}"
            + (f", range {count.min()}..{count.max()}" if count.size else "")
        )


def _kernel_body(
    q_ref,
    k_ref,
    vt_ref,
    qs_ref,
    ks_ref,
    vs_ref,
    bias_ref,
    blocks_ref,
    count_ref,
    valid_ref,
    tokens_ref,
    order_ref,
    start_ref,
    o_ref,
    lse_ref,
    q_smem,
    k_smem,
    v_smem,
    p_smem,
    o_smem,
    lse_smem,
    q_ready,
    k_full,
    v_full,
    k_empty,
    v_empty,
    turn,
    *,
    padded_tile: int,
    qk_scale: float,
    p_scale: float,
    launch: MosaicLaunch,
    in_place_pv: bool,
    ctas: int | None,
):
    consumers = padded_tile // BLOCK_Q
    key_blocks = padded_tile // BLOCK_KV
    stages = launch.stages
    fp8 = jnp.dtype(v_smem.dtype) == jnp.dtype(jnp.float8_e4m3fn)
    p_operand = None
    if launch.p_in_registers:
        p_operand = _fp8_operand_from_accumulator() if fp8 else lambda p: p.astype(v_smem.dtype)
    head_dim = q_smem.shape[-1]
    rescale = _rescale_where_needed(head_dim) if launch.lazy_rescale else None
    wg = lax.axis_index("wg")
    if ctas is None:  # one CTA per grid cell: (query tile, head, batch, its key-block count >= 1)
        cell = [lax.axis_index(name) for name in ("tile", "head", "batch")]
        cell.append(count_ref[cell[0]])
    n_tiles, heads, batches = count_ref.shape[0], q_ref.shape[1], q_ref.shape[0]
    items = n_tiles * heads * batches

    def item_of(i):
        """(query tile, head, batch) of the i-th entry of the persistent schedule (`order_ref`
        holds item ids w, tiles fastest as in the grid's order)."""
        w = order_ref[i]
        return lax.rem(w, n_tiles), lax.rem(w // n_tiles, heads), w // (n_tiles * heads)

    def for_each_item(body):
        """Runs body(u, head, batch, steps, base, following) for each (query tile, head, batch)
        this CTA computes: its grid cell, or (persistent) its run of the schedule, entries
        start[cta] .. start[cta + 1] - 1; steps is the tile's key-block count, base counts the
        key blocks the ring carried before the item (the int 0 for the first), and following
        is (u, head, batch, exists) of the CTA's next item (None for a grid cell). Returns the
        ring's block count after them."""
        if ctas is None:
            body(*cell, 0, None)
            return cell[3]
        cta = lax.axis_index("cta")
        end = start_ref[cta + 1]

        def item(i, base):
            u, head, batch = item_of(i)
            steps = count_ref[u]
            following = (*item_of(jnp.minimum(i + 1, items - 1)), i + 1 < end)
            body(u, head, batch, steps, base, following)
            return base + steps

        return lax.fori_loop(start_ref[cta], end, item, jnp.int32(0))

    def rows_of(u):
        """This consumer's 64 query rows (slots) of tile u."""
        return pl.ds(u * padded_tile + wg * BLOCK_Q, BLOCK_Q)

    def load_q(head, batch, rows):
        """TMA of this consumer's Q rows into its SMEM slot (q_ready)."""
        plgpu.copy_gmem_to_smem(q_ref.at[batch, head, rows], q_smem.at[wg], q_ready.at[wg])

    def attends(u):
        """Whether this consumer computes tile u (slots are valid first: its rows are all
        padding iff its first one is) rather than only pacing the ring."""
        if not launch.skip_padding_rows:
            return True
        return bias_ref[u * padded_tile + wg * BLOCK_Q] == 0

    def ring_slot(base):
        """The ring slot of an item's step j, the item's blocks following `base` others."""
        return lambda j: lax.rem(base + j, stages)

    def key_columns(u, j):
        """(key tile, first slot) of step j: the j-th listed key block of query tile u."""
        block = blocks_ref[u, j]
        return block // key_blocks, block * BLOCK_KV

    def _consumer_item(u, head, batch, steps, base, following):
        slot_of = ring_slot(base)

        def load_next_q():
            """Persistent CTAs: once this item's last Q.K^T is done, load the next item's Q
            rows (where this consumer attends it), so they arrive during this item's end."""
            if following is not None:
                u_next, head_next, batch_next, exists = following
                go = jnp.logical_and(exists, attends(u_next))
                # Every warp of the warpgroup past its wait on the last Q.K^T (a warpgroup
                # barrier) before the TMA overwrites the Q it read.
                plgpu.commit_smem()
                pl.when(go)(lambda: load_q(head_next, batch_next, rows_of(u_next)))

        rows = rows_of(u)
        pass_turn = lambda: plgpu.barrier_arrive(turn.at[lax.rem(wg + 1, consumers)])

        def write_rows(out, lse):
            """Stores this consumer's output rows (out [BLOCK_Q, D] float32, WGMMA layout; None
            for rows that are all padding: zeros in the kernel layout, nothing in token order)
            in token order from registers, or by TMA through SMEM in the kernel layout, and
            lse2 [BLOCK_Q]. Persistent CTAs wait for a store's SMEM reads only before the next
            item's rows overwrite it, so the store overlaps the next item."""
            if ctas is not None:
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            lse_smem[wg] = lse
            if tokens_ref is None:
                if out is None:
                    zeros = jnp.zeros((BLOCK_Q, head_dim), jnp.float32)
                    out = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)
                o_smem[wg] = out.astype(o_smem.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[batch, head, rows])
            else:
                plgpu.commit_smem()
                if out is not None:
                    store = _store_rows_by_token()
                    store(out.astype(o_ref.dtype), o_ref.at[batch, :, head], tokens_ref.at[rows])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, rows])
            if ctas is None:
                plgpu.wait_smem_to_gmem(0)

        def _attend():  # this consumer's 64 query rows hold a real token
            if following is None:  # else loaded by the previous item (or before the first)
                load_q(head, batch, rows)
            q_scale = qs_ref[batch, head, u] * qk_scale

            def step_inputs(j):
                """(score scale, the key block's real slots (an int) or its key bias
                [BLOCK_KV] without the valid_slots table) of step j."""
                key_tile, col = key_columns(u, j)
                pair_scale = q_scale * ks_ref[batch, head, key_tile]
                if valid_ref is None:
                    bias = plgpu.load(
                        bias_ref.at[pl.ds(col, BLOCK_KV)], layout=_COL, optimized=False
                    )
                    return pair_scale, bias
                return pair_scale, valid_ref[col // BLOCK_KV]

            def masked(s, padding):
                """s [BLOCK_Q, BLOCK_KV] with its padding columns at -inf. `padding` is the key
                block's real-slot count (slots are valid first, so the columns from it on are
                padding): only a block holding padding pays for the select, the rest of the
                steps carry one int. Without the valid_slots table it is the key bias itself."""
                if valid_ref is None:
                    return s + lax.broadcast_in_dim(padding, s.shape, [1])
                valid = padding

                def mask(s):
                    cols = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
                    return jnp.where(cols < valid, s, -jnp.inf)

                return lax.cond(valid < BLOCK_KV, mask, lambda s: s, s)

            def issue_scores(s_ref, j):
                slot = slot_of(j)
                plgpu.barrier_wait(k_full.at[slot])
                plgpu.wgmma(s_ref, q_smem.at[wg], k_smem.at[slot].T)

            def scores(j):
                """Q.K^T of step j [BLOCK_Q, BLOCK_KV] float32, waited for; K's slot released."""

                def run(s_ref):
                    issue_scores(s_ref, j)
                    return s_ref[...]

                s = pl.run_scoped(run, plgpu.ACC((BLOCK_Q, BLOCK_KV), jnp.float32))
                plgpu.barrier_arrive(k_empty.at[slot_of(j)])
                return s

            def exponent_shift(m):
                """c of the module docstring: what p' subtracts from the scores, per row."""
                if p_scale == 1.0:
                    return m
                return jnp.where(jnp.abs(m) < 2.0**20, m - math.log2(p_scale), m)

            def softmax(s, inputs, acc, m_i, l_i):
                """Online-softmax update with the scores of one step; P goes to this warpgroup's
                SMEM slot. Returns the rescaled accumulator and the new row max and sum."""
                pair_scale, padding = inputs
                s = masked(s * pair_scale, padding)
                m_new = jnp.maximum(m_i, s.max(axis=1))
                shift = exponent_shift(m_new)
                alpha = jnp.exp2(exponent_shift(m_i) - shift)
                p = jnp.exp2(s - lax.broadcast_in_dim(shift, s.shape, [0]))  # p_scale * exp2(s - m)
                l_i = l_i * alpha + p.sum(axis=1)
                alpha = lax.broadcast_in_dim(alpha, acc.shape, [0])
                acc = acc * alpha if rescale is None else rescale(acc, alpha)
                if p_operand is not None:
                    return acc, m_new, l_i, p_operand(p)
                p_smem[wg] = p.astype(p_smem.dtype)
                plgpu.commit_smem()  # P's stores visible to the wgmma that reads them
                return acc, m_new, l_i, p_smem.at[wg]

            def weighted_values(acc, p, j, after_issue=lambda: None):
                """acc + P.V of step j (P in SMEM or registers), waited for (and every wgmma issued
                before it); V's slot released. after_issue() runs once the wgmma is issued."""
                slot = slot_of(j)
                plgpu.barrier_wait(v_full.at[slot])
                if in_place_pv:

                    def accumulate(acc_ref):
                        plgpu.wgmma(acc_ref, p, v_smem.at[slot].T)
                        after_issue()

                    acc = pl.run_state(accumulate)(plgpu.ACC.init(acc))
                else:

                    def product(pv_ref):
                        plgpu.wgmma(pv_ref, p, v_smem.at[slot].T)
                        after_issue()
                        return pv_ref[...]

                    acc = acc + pl.run_scoped(product, plgpu.ACC((BLOCK_Q, head_dim), jnp.float32))
                plgpu.barrier_arrive(v_empty.at[slot])
                return acc

            m_i = plgpu.layout_cast(jnp.full((BLOCK_Q,), -1e30, jnp.float32), _ROW)
            l_i = plgpu.layout_cast(jnp.zeros((BLOCK_Q,), jnp.float32), _ROW)
            acc = plgpu.layout_cast(jnp.zeros((BLOCK_Q, head_dim), jnp.float32), plgpu.Layout.WGMMA)
            plgpu.barrier_wait(q_ready.at[wg])

            if launch.pingpong:
                # Consumer wg issues its products only in its turn and hands the turn to the next
                # one right after issuing, so one consumer's softmax overlaps the others' wgmmas.
                # Step j issues Q.K^T of j and P.V of j - 1 together; the last P.V runs alone.

                def first_scores(s_ref):
                    issue_scores(s_ref, 0)
                    pass_turn()
                    return s_ref[...]

                inputs = step_inputs(0)
                plgpu.barrier_wait(turn.at[wg])
                s = pl.run_scoped(first_scores, plgpu.ACC((BLOCK_Q, BLOCK_KV), jnp.float32))
                plgpu.barrier_arrive(k_empty.at[slot_of(0)])
                next_inputs = step_inputs(jnp.minimum(1, steps - 1))
                acc, m_i, l_i, p = softmax(s, inputs, acc, m_i, l_i)
                # P from registers is loop state; P in SMEM is this consumer's slot, not carried.
                p_state = p if p_operand is not None else None
                p_of = lambda p_state: p_state if p_operand is not None else p_smem.at[wg]

                def step(j, carry):
                    acc, m_i, l_i, p_state, inputs = carry
                    p = p_of(p_state)
                    # Loaded early: off the critical path.
                    next_inputs = step_inputs(jnp.minimum(j + 1, steps - 1))

                    def products(s_ref):
                        plgpu.barrier_wait(turn.at[wg])
                        issue_scores(s_ref, j)
                        acc_ = weighted_values(acc, p, j - 1, after_issue=pass_turn)
                        return acc_, s_ref[...]

                    acc, s = pl.run_scoped(products, plgpu.ACC((BLOCK_Q, BLOCK_KV), jnp.float32))
                    plgpu.barrier_arrive(k_empty.at[slot_of(j)])
                    acc, m_i, l_i, p = softmax(s, inputs, acc, m_i, l_i)
                    return acc, m_i, l_i, p if p_operand is not None else None, next_inputs

                carry = (acc, m_i, l_i, p_state, next_inputs)
                acc, m_i, l_i, p_state, _ = lax.fori_loop(1, steps, step, carry)
                load_next_q()
                plgpu.barrier_wait(turn.at[wg])
                acc = weighted_values(acc, p_of(p_state), steps - 1, after_issue=pass_turn)

            elif launch.pipeline:
                # Step j's softmax runs while step j + 1's scores are computed; the last step has no
                # successor and runs on its own.
                def step(j, carry):
                    acc, m_i, l_i, s, inputs = carry
                    next_inputs = step_inputs(j + 1)

                    def overlapped(s_next_ref):
                        issue_scores(s_next_ref, j + 1)
                        acc_, m_, l_, p = softmax(s, inputs, acc, m_i, l_i)
                        acc_ = weighted_values(acc_, p, j)
                        return acc_, m_, l_, s_next_ref[...]

                    acc, m_i, l_i, s = pl.run_scoped(
                        overlapped, plgpu.ACC((BLOCK_Q, BLOCK_KV), jnp.float32)
                    )
                    plgpu.barrier_arrive(k_empty.at[slot_of(j + 1)])
                    return acc, m_i, l_i, s, next_inputs

                carry = (acc, m_i, l_i, scores(0), step_inputs(0))
                acc, m_i, l_i, s, inputs = lax.fori_loop(0, steps - 1, step, carry)
                load_next_q()
                acc, m_i, l_i, p = softmax(s, inputs, acc, m_i, l_i)
                acc = weighted_values(acc, p, steps - 1)
            else:

                def step(j, carry):
                    acc, m_i, l_i, inputs = carry
                    s = scores(j)
                    if launch.prefetch:
                        next_inputs = step_inputs(jnp.minimum(j + 1, steps - 1))
                    else:
                        inputs = next_inputs = step_inputs(j)
                    acc, m_i, l_i, p = softmax(s, inputs, acc, m_i, l_i)
                    return weighted_values(acc, p, j), m_i, l_i, next_inputs

                carry = (acc, m_i, l_i, step_inputs(0))
                acc, m_i, l_i, _ = lax.fori_loop(0, steps, step, carry)
                load_next_q()

            v_scale = plgpu.load(vs_ref.at[batch, head], layout=_COL, optimized=False)
            out = acc * lax.broadcast_in_dim(v_scale, acc.shape, [1])
            out = out * lax.broadcast_in_dim(1.0 / l_i, acc.shape, [0])
            write_rows(out, exponent_shift(m_i) + jnp.log2(l_i))

        def _pace():
            """A consumer whose rows are all padding computes nothing: it only keeps the ring's
            barriers (and the turns) going, then writes lse 0 (and zero rows in the kernel
            layout)."""
            load_next_q()

            def release(j, full, empty):
                plgpu.barrier_wait(full.at[slot_of(j)])
                plgpu.barrier_arrive(empty.at[slot_of(j)])

            if launch.pingpong:  # steps + 1 turns, V one step behind K, as in _attend

                @pl.loop(0, steps + 1)
                def _turn(j):
                    plgpu.barrier_wait(turn.at[wg])
                    pl.when(j < steps)(lambda: release(j, k_full, k_empty))
                    pl.when(j > 0)(lambda: release(j - 1, v_full, v_empty))
                    pass_turn()

            else:

                @pl.loop(0, steps)
                def _step(j):
                    release(j, k_full, k_empty)
                    release(j, v_full, v_empty)

            write_rows(None, plgpu.layout_cast(jnp.zeros((BLOCK_Q,), jnp.float32), _ROW))

        if launch.pingpong:  # the first turn; a later item's is the last one's final hand-over
            first = wg == consumers - 1
            first = first if ctas is None else jnp.logical_and(first, base == 0)
            plgpu.barrier_arrive(turn.at[0], predicate=first)
        if launch.skip_padding_rows:
            live = attends(u)
            pl.when(live)(_attend)
            pl.when(jnp.logical_not(live))(_pace)
        else:
            _attend()

    @pl.when(wg < consumers)
    def _consumer():
        if launch.consumer_registers:
            plgpu.set_max_registers(launch.consumer_registers, action="increase")
        if ctas is not None:  # the first item's Q; each item loads the next one's
            u, head, batch = item_of(start_ref[lax.axis_index("cta")])
            pl.when(attends(u))(lambda: load_q(head, batch, rows_of(u)))
        for_each_item(_consumer_item)
        if ctas is not None:
            plgpu.wait_smem_to_gmem(0)  # the last item's stores
        if launch.pingpong:

            @pl.when(wg == 0)
            def _last_turn():  # the last consumer's final hand-over, so every phase is waited
                plgpu.barrier_wait(turn.at[0])

    @pl.when(wg == consumers)
    def _producer():
        if launch.producer_registers:
            plgpu.set_max_registers(launch.producer_registers, action="decrease")

        def issue(u, head, batch, j, slot):
            _, col = key_columns(u, j)
            keys = pl.ds(col, BLOCK_KV)
            plgpu.copy_gmem_to_smem(k_ref.at[batch, head, keys], k_smem.at[slot], k_full.at[slot])
            plgpu.copy_gmem_to_smem(
                vt_ref.at[batch, head, :, keys], v_smem.at[slot], v_full.at[slot]
            )

        def wait_empty(slot):
            plgpu.barrier_wait(k_empty.at[slot])
            plgpu.barrier_wait(v_empty.at[slot])

        if ctas is None:
            u, head, batch, blocks = cell
            for j in range(stages):  # the first fills, each only where the tile has that many
                pl.when(j < blocks)(lambda j=j: issue(u, head, batch, j, j))

            @pl.loop(stages, jnp.maximum(blocks, stages))
            def _refill(j):
                slot = lax.rem(j, stages)
                wait_empty(slot)
                issue(u, head, batch, j, slot)

        else:  # one ring through every item: the next item's blocks load while this one ends

            def producer_item(u, head, batch, steps, base, following):
                @pl.loop(0, steps)
                def _fill(j):
                    slot = lax.rem(base + j, stages)
                    pl.when(base + j >= stages)(lambda: wait_empty(slot))
                    issue(u, head, batch, j, slot)

            blocks = for_each_item(producer_item)

        # Observe the consumers' last releases too, so every barrier phase is waited for
        # (the interpreter checks it; on the GPU this only delays the producer's exit).
        @pl.loop(jnp.maximum(blocks - stages, 0), blocks)
        def _drain(j):
            wait_empty(lax.rem(j, stages))


def fpsa_forward(
    q,
    k,
    v_t,
    q_scale,
    k_scale,
    v_scale,
    key_bias,
    key_blocks: np.ndarray,
    block_count: np.ndarray,
    *,
    padded_tile: int,
    scale: float,
    p_scale: float,
    out_dtype,
    valid_slots: np.ndarray | None = None,
    slot_token: np.ndarray | None = None,
    launch: MosaicLaunch | None = None,
    interpret: bool = False,
):
    """Runs the Mosaic GPU forward (shapes in the module docstring).

    Args:
      q, k: [B, N, Lp, D] E4M3 (or bf16) values; v_t: [B, N, D, Lp].
      q_scale, k_scale: float32 [B, N, n_tiles]; v_scale: float32 [B, N, D].
      key_bias: float32 [Lp], 0 or -inf.
      key_blocks: host int32 [n_tiles, M], block_count: host int32 [n_tiles]: the key blocks of
        64 slots that each query tile reads (`kernel_layout.key_block_list`).
      valid_slots: host int32 [Lp / 64], the real slots of each key block (0..64), which come
        first in it (`kernel_layout.key_block_valid_slots`; it must agree with key_bias): the
        kernel sets the scores of a block's other columns to -inf; None adds the key bias of
        every block.
      slot_token: host int32 [Lp], the token of each slot or -1 (`kernel_layout.slot_tokens`):
        when given, o is stored in token order [B, L, N, D] straight from registers (GPU only);
        None stores the kernel layout.
      padded_tile: Pp (64, 128 or 192). scale: softmax scale. p_scale: P's static FP8 scale (1
        for bf16 operands).
      launch: pipeline depth and registers (default: `default_launch`).
      interpret: run in Mosaic GPU's interpreter (any backend; slow).

    Returns:
      (o in out_dtype: [B, L, N, D] with slot_token, else [B, N, Lp, D] with padded rows
      finite; lse2 float32 [B, N, Lp]).
    """
    check_operands(
        q, k, v_t, q_scale, k_scale, v_scale, key_bias, key_blocks, block_count, padded_tile
    )
    if p_scale <= 0:
        raise ValueError(f"P's static scale must be positive, got {p_scale}")
    b, n, lp, d = q.shape
    launch = launch or default_launch(padded_tile, d, q.dtype, out_dtype, interpret=interpret)
    if launch.stages < 2:
        raise ValueError(f"MosaicLaunch.stages must be >= 2, got {launch.stages}")
    if launch.pingpong and launch.pipeline:
        raise ValueError("MosaicLaunch: pingpong and pipeline are two schedules; pick one")
    if interpret and (launch.lazy_rescale or launch.p_in_registers or slot_token is not None):
        raise ValueError(
            "lazy_rescale, p_in_registers and the token-order store (slot_token) are inline "
            "Mosaic GPU code, which the interpreter cannot run"
        )
    if interpret:
        warn_if_interpreter_may_deadlock(padded_tile // BLOCK_Q + 1)
    if slot_token is not None:
        slot_token = np.asarray(slot_token)
        if slot_token.shape != (lp,):
            raise ValueError(f"slot_token must be [Lp] = [{lp}], got {slot_token.shape}")
        length = int(slot_token.max()) + 1
        if np.count_nonzero(slot_token >= 0) != length:
            raise ValueError("slot_token must hold each token 0..L-1 exactly once")
    if valid_slots is not None:
        valid_slots = np.asarray(valid_slots)
        if valid_slots.shape != (lp // BLOCK_KV,):
            raise ValueError(
                f"valid_slots must be [Lp / {BLOCK_KV}] = [{lp // BLOCK_KV}], got "
                f"{valid_slots.shape}"
            )
        if valid_slots.size and not 0 <= valid_slots.min() <= valid_slots.max() <= BLOCK_KV:
            raise ValueError(f"valid_slots must count 0..{BLOCK_KV} real slots per key block")
    token_order = slot_token is not None
    need = smem_bytes(launch, padded_tile, d, q.dtype, out_dtype, token_order=token_order)
    if need > SMEM_BYTES:
        raise ValueError(
            f"{launch} needs {need} bytes of SMEM at Pp = {padded_tile}, D = {d}, {q.dtype} "
            f"operands, {jnp.dtype(out_dtype).name} output; a block has {SMEM_BYTES}: use fewer "
            f"stages"
        )
    consumers = padded_tile // BLOCK_Q
    items = lp // padded_tile * n * b
    if launch.persistent_ctas is not None and launch.persistent_ctas < 1:
        raise ValueError(f"MosaicLaunch.persistent_ctas must be >= 1, got {launch.persistent_ctas}")
    static = dict(
        padded_tile=padded_tile,
        qk_scale=float(scale) * LOG2_E,
        p_scale=float(p_scale),
        launch=launch,
        in_place_pv=not interpret,
        ctas=None if launch.persistent_ctas is None else min(launch.persistent_ctas, items),
    )
    has_valid, has_tokens = valid_slots is not None, slot_token is not None
    persistent = static["ctas"] is not None
    inputs = 9 + has_valid + has_tokens + 2 * persistent

    def body(*refs):  # optional tables, p_smem / o_smem are None where not used
        valid = refs[9] if has_valid else None
        tokens = refs[9 + has_valid] if has_tokens else None
        schedule = refs[inputs - 2 : inputs] if persistent else (None, None)
        outputs_and_smem = list(refs[inputs:])  # o, lse, q_smem, k_smem, v_smem, [p_smem], ...
        if launch.p_in_registers:
            outputs_and_smem.insert(5, None)
        if has_tokens:  # the token-order store writes from registers: no output staging
            outputs_and_smem.insert(6, None)
        _kernel_body(*refs[:9], valid, tokens, *schedule, *outputs_and_smem, **static)

    scratch = [
        _smem((consumers, BLOCK_Q, d), q.dtype),  # Q rows of each consumer
        _smem((launch.stages, BLOCK_KV, d), k.dtype),  # K ring
        _smem((launch.stages, d, BLOCK_KV), v_t.dtype),  # V^T ring
    ]
    if not launch.p_in_registers:
        scratch.append(_smem((consumers, BLOCK_Q, BLOCK_KV), v_t.dtype))  # P of each consumer
    if not has_tokens:
        scratch.append(_smem((consumers, BLOCK_Q, d), out_dtype))  # output staging
    scratch += [
        plgpu.SMEM((consumers, BLOCK_Q), jnp.float32),  # lse staging
        plgpu.Barrier(num_barriers=consumers),  # Q landed
        plgpu.Barrier(num_barriers=launch.stages),  # K slot full
        plgpu.Barrier(num_barriers=launch.stages),  # V slot full
        plgpu.Barrier(num_arrivals=consumers, num_barriers=launch.stages),  # K slot empty
        plgpu.Barrier(num_arrivals=consumers, num_barriers=launch.stages),  # V slot empty
        plgpu.Barrier(num_barriers=consumers),  # each consumer's turn (pingpong)
    ]
    o_shape = (b, length, n, d) if has_tokens else (b, n, lp, d)
    kernel = plgpu.kernel(
        body,
        out_type=(
            jax.ShapeDtypeStruct(o_shape, out_dtype),
            jax.ShapeDtypeStruct((b, n, lp), jnp.float32),
        ),
        scratch_types=tuple(scratch),
        grid=(static["ctas"],) if persistent else (lp // padded_tile, n, b),
        grid_names=("cta",) if persistent else ("tile", "head", "batch"),
        num_threads=consumers + 1,
        thread_name="wg",
        kernel_name="fpsa_forward_mosaic",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    tables = [
        jnp.asarray(np.ascontiguousarray(key_blocks, dtype=np.int32)),
        jnp.asarray(np.ascontiguousarray(block_count, dtype=np.int32)),
    ]
    if valid_slots is not None:
        tables.append(jnp.asarray(np.ascontiguousarray(valid_slots, dtype=np.int32)))
    if has_tokens:
        tables.append(jnp.asarray(np.ascontiguousarray(slot_token, dtype=np.int32)))
    if persistent:
        # An item's work: its key blocks times the consumers that compute them. A consumer
        # holds only padding where its first slot, the first of a key block, is padding; without
        # the valid-slot table, count them all.
        cost = np.asarray(block_count, np.int64)
        if has_valid and launch.skip_padding_rows:
            first_blocks = valid_slots.reshape(-1, padded_tile // BLOCK_KV)[
                :, :: BLOCK_Q // BLOCK_KV
            ]
            cost = cost * np.count_nonzero(first_blocks > 0, axis=1)
        order, start = item_schedule(np.tile(cost, n * b), static["ctas"])
        tables += [jnp.asarray(order), jnp.asarray(start)]
    return kernel(q, k, v_t, q_scale, k_scale, v_scale, key_bias, *tables)
