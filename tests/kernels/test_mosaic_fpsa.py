"""impl="mosaic": the warp-specialized Mosaic GPU forward (with the Triton backward).

CPU: the shared kernel suite on two cases in Mosaic GPU's interpreter (its barriers, TMA copies and
wgmma are simulated; the P.V product accumulates out of place there, see the kernel's docstring),
the compiled kernel's CUDA lowering (jax.export), the valid-slot table against brute force, and
every error branch. GPU (marker `gpu`, or the suite whenever JAX sees a GPU): the compiled kernel
on all suite cases, its launch options against each other, the backward, the Wan 480p shape and
what impl="auto" picks.
"""

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import export

from fpsa_jax.attention import FPSAConfig, fpsa_attention
from fpsa_jax.attention.api import resolve_impl
from fpsa_jax.attention.kernel_layout import (
    key_block_list,
    key_block_valid_slots,
    output_from_kernel,
    quantize_for_kernel,
    slot_tokens,
)
from fpsa_jax.attention.mosaic import mosaic_attention
from pallas_kernels import mosaic_fpsa_fwd as mf
from tests.kernels.kernel_suite import CASES, KernelBehaviour, config_of, rel_err

ON_GPU = jax.default_backend() == "gpu"


def _default():
    """The default launch of the compiled FP8 kernel at Pp = 192, D = 128."""
    return mf.default_launch(192, 128, jnp.float8_e4m3fn, jnp.bfloat16)


class TestMosaicKernel(KernelBehaviour):
    impl = "mosaic"
    differentiable = ON_GPU  # the Triton backward needs a GPU
    cases = CASES if ON_GPU else CASES[:2]  # the interpreter takes ~10 s a case

    def attention(self, q, k, v, grid, config, scale):
        if ON_GPU:
            return super().attention(q, k, v, grid, config, scale)
        fn = lambda q, k, v: mosaic_attention(
            q, k, v, grid=grid, config=config, scale=scale, interpret=True
        )
        return jax.jit(fn)(q, k, v)

    def kernel(self, ops, info, scale, p_scale, out_dtype):
        args = (ops.q, ops.k, ops.v_t, ops.q_scale, ops.k_scale, ops.v_scale, ops.key_bias)
        valid = key_block_valid_slots(ops.grid, ops.tile, ops.padded_tile, mf.BLOCK_KV)
        blocks = key_block_list(ops.grid, ops.tile, info.window, ops.padded_tile, mf.BLOCK_KV)
        fn = lambda *a: mf.fpsa_forward(
            *a, blocks.blocks, blocks.count, padded_tile=ops.padded_tile, scale=scale,
            p_scale=p_scale, out_dtype=out_dtype, valid_slots=valid, interpret=not ON_GPU,
        )  # fmt: skip
        return jax.jit(fn)(*args)


def test_key_block_valid_slots_count_the_real_slots_that_lead_each_block():
    """The kernel masks a block's columns from this count on, so the real slots must be its
    first ones: checked slot by slot against the token table."""
    grid, tile, pp = (4, 9, 10), (3, 8, 8), 192
    tokens = slot_tokens(grid, tile, pp).reshape(-1, 64)
    got = key_block_valid_slots(grid, tile, pp, 64)
    assert got.dtype == np.int32 and got.shape == (len(tokens),)
    for block, valid in zip(tokens, got, strict=True):
        assert np.all(block[:valid] >= 0) and np.all(block[valid:] < 0)
    assert {0, 64} < set(got.tolist())  # full, empty and partial blocks all occur


def _operands(quant="fp8", d=64, grid=(3, 8, 8), tile=(3, 8, 8)):
    q = jnp.zeros((1, math.prod(grid), 1, d), jnp.bfloat16)
    return quantize_for_kernel(q, q, q, grid, FPSAConfig(tile=tile, quant=quant), block_n=64)


def _forward(ops, **kwargs):
    args = (ops.q, ops.k, ops.v_t, ops.q_scale, ops.k_scale, ops.v_scale, ops.key_bias)
    n_tiles = ops.q.shape[2] // ops.padded_tile
    table = kwargs.pop("key_blocks", np.zeros((n_tiles, 1), np.int32))
    count = kwargs.pop("block_count", np.ones((n_tiles,), np.int32))
    defaults = dict(padded_tile=ops.padded_tile, scale=0.1, p_scale=448.0, out_dtype=jnp.bfloat16)
    return mf.fpsa_forward(*args, table, count, **{**defaults, **kwargs})


def test_kernel_rejects_operands_it_cannot_take():
    ops = _operands()
    with pytest.raises(ValueError, match=r"v_t must be \[B, N, D, Lp\]"):
        _forward(ops.replace(v_t=ops.k))
    with pytest.raises(ValueError, match="float8_e4m3fn or bfloat16"):
        f32 = {f: getattr(ops, f).astype(jnp.float32) for f in ("q", "k", "v_t")}
        _forward(ops.replace(**f32))
    with pytest.raises(ValueError, match="head dim D in"):
        _forward(_operands(d=32))
    with pytest.raises(ValueError, match="padded tile Pp in 64, 128 or 192"):
        _forward(_operands(grid=(4, 8, 8), tile=(4, 8, 8)))
    with pytest.raises(ValueError, match=r"k_scale must have shape \(1, 1, 1\)"):
        _forward(ops.replace(k_scale=jnp.ones((1, 1, 2))))
    with pytest.raises(ValueError, match=r"key_blocks must be \[n_tiles=1, M\]"):
        _forward(ops, key_blocks=np.zeros((2, 1), np.int32))
    with pytest.raises(ValueError, match=r"block_count must be \[n_tiles=1\] with entries in 1..1"):
        _forward(ops, block_count=np.zeros((1,), np.int32))
    with pytest.raises(ValueError, match=r"block_count must be .* got shape \(2,\)"):
        _forward(ops, block_count=np.ones((2,), np.int32))
    with pytest.raises(ValueError, match=r"valid_slots must be \[Lp / 64\] = \[3\]"):
        _forward(ops, valid_slots=np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="valid_slots must count 0..64 real slots"):
        _forward(ops, valid_slots=np.array([64, 65, 0], np.int32))
    with pytest.raises(ValueError, match="static scale must be positive"):
        _forward(ops, p_scale=0.0)
    with pytest.raises(ValueError, match="stages must be >= 2"):
        _forward(ops, launch=mf.MosaicLaunch(stages=1))
    with pytest.raises(ValueError, match="bytes of SMEM .* use fewer stages"):
        _forward(_operands(quant="none", d=128), launch=mf.MosaicLaunch(stages=8))
    with pytest.raises(ValueError, match="pingpong and pipeline are two schedules"):
        _forward(ops, launch=mf.MosaicLaunch(pingpong=True, pipeline=True))
    with pytest.raises(ValueError, match="persistent_ctas must be >= 1"):
        _forward(ops, launch=mf.MosaicLaunch(persistent_ctas=0))
    with pytest.raises(ValueError, match=r"slot_token must be \[Lp\] = \[192\]"):
        _forward(ops, slot_token=np.arange(191, dtype=np.int32))
    with pytest.raises(ValueError, match="each token 0..L-1 exactly once"):
        _forward(ops, slot_token=np.zeros(192, np.int32))


@pytest.mark.parametrize(
    "options",
    [
        dict(launch=mf.MosaicLaunch(lazy_rescale=True)),
        dict(launch=mf.MosaicLaunch(p_in_registers=True)),
        dict(slot_token=np.arange(192, dtype=np.int32)),
    ],
    ids=["lazy_rescale", "p_in_registers", "slot_token"],
)
def test_interpreter_refuses_inline_mosaic_code(options):
    with pytest.raises(ValueError, match="the interpreter cannot run"):
        _forward(_operands(), interpret=True, **options)


@pytest.mark.parametrize(
    ("quant", "options"),
    [
        ("fp8", {}),
        ("none", {}),
        ("fp8", dict(slot_token=np.arange(192, dtype=np.int32))),
        ("fp8", dict(launch=mf.MosaicLaunch(pipeline=True, prefetch=False, stages=2))),
        ("fp8", dict(launch=dataclasses.replace(_default(), persistent_ctas=None))),
    ],
    ids=["fp8", "bf16", "token-order-store", "pipeline", "one-cta-per-item"],
)
def test_the_compiled_kernel_lowers_for_cuda_on_any_machine(quant, options):
    """The GPU kernel itself (not the interpreter's variant), lowered for CUDA by jax.export: the
    inline Mosaic GPU code only a GPU runs (lazy rescale, P from registers, the token-order
    store; the default launch has the first two) is built on every machine, CI's included."""
    ops = _operands(quant)
    fields = ("q", "k", "v_t", "q_scale", "k_scale", "v_scale", "key_bias")
    forward = lambda *arrays: _forward(
        ops.replace(**dict(zip(fields, arrays, strict=True))), **options
    )
    args = [getattr(ops, f) for f in fields]
    module = export.export(jax.jit(forward), platforms=["cuda"])(*args).mlir_module()
    assert "stablehlo.custom_call @mosaic_gpu_v2" in module


@pytest.mark.parametrize(("env", "warns"), [({"PJRT_NPROC": "5"}, True), ({"NPROC": "6"}, False)])
def test_interpreter_warns_where_the_cpu_pool_can_deadlock(monkeypatch, env, warns):
    """Four warpgroups (Pp = 192) need a pool of six threads; the tests run with eight."""
    assert mf.xla_cpu_pool_threads() >= 6  # conftest's PJRT_NPROC, or this machine's cores
    for name in ("PJRT_NPROC", "NPROC"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mf.warn_if_interpreter_may_deadlock(4)
    assert [str(w.message) for w in caught if "deadlock" in str(w.message)] == (
        ["Mosaic GPU's interpreter runs this kernel's 4 warpgroups as CPU computations that wait "
         "for each other, and XLA's CPU pool has 5 threads here: it can deadlock. Set "
         "PJRT_NPROC=6 (or more) before JAX starts."] if warns else []
    )  # fmt: skip


# The interpreter is a CPU tool (CI runs these); on a GPU machine its warpgroups become device
# computations synchronising through host callbacks, far slower, and the compiled kernel's own
# tests (test_launch_options_compute_the_same_attention) cover the same launches there.
@pytest.mark.skipif(ON_GPU, reason="interpreter schedules are checked on the CPU")
@pytest.mark.parametrize(
    "launch",
    [
        mf.MosaicLaunch(pingpong=True),
        mf.MosaicLaunch(skip_padding_rows=True),
        mf.MosaicLaunch(pingpong=True, skip_padding_rows=True),
        mf.MosaicLaunch(pingpong=True, skip_padding_rows=True, persistent_ctas=3),
        mf.MosaicLaunch(persistent_ctas=2),
    ],
    ids=["pingpong", "skip_padding_rows", "both", "both-persistent", "persistent"],
)
def test_schedules_compute_what_the_default_does_in_the_interpreter(launch):
    """The turn ring only reorders when each consumer issues its products, a consumer of
    padding rows only paces the ring, and persistent CTAs only walk several tiles with one ring:
    same values, and the barriers (checked by the interpreter) neither deadlock nor leave a
    phase unwaited. W = 10 leaves edge tiles of 48 real tokens, whose second and third
    consumers hold only padding; the 8 tiles on 3 (or 2) persistent CTAs carry the ring and
    the turns from tile to tile, through tiles of different block counts."""
    grid, config = (4, 9, 10), FPSAConfig(tile=(3, 8, 8), window=(1, 1, 1), quant="fp8")
    keys = jax.random.split(jax.random.key(3), 3)
    q, k, v = (jax.random.normal(kk, (1, math.prod(grid), 1, 64), jnp.bfloat16) for kk in keys)
    run = lambda launch: jax.jit(
        lambda q, k, v: mosaic_attention(
            q, k, v, grid=grid, config=config, scale=0.125, launch=launch, interpret=True
        )
    )(q, k, v)
    np.testing.assert_array_equal(
        np.asarray(run(launch), np.float32), np.asarray(run(None), np.float32)
    )


def test_default_launch_fits_shared_memory():
    for dtype in (jnp.float8_e4m3fn, jnp.bfloat16):
        for pp in (64, 128, 192):
            launch = mf.default_launch(pp, 128, dtype, jnp.bfloat16)
            assert mf.smem_bytes(launch, pp, 128, dtype, jnp.bfloat16) <= mf.SMEM_BYTES
    assert mf.default_launch(192, 128, jnp.float8_e4m3fn, jnp.bfloat16).stages == 4


def test_default_launch_is_the_tuned_schedule_and_the_interpreter_gets_what_it_can_run():
    tuned = mf.default_launch(192, 128, jnp.float8_e4m3fn, jnp.bfloat16)
    assert tuned.pingpong and tuned.skip_padding_rows and tuned.lazy_rescale
    assert tuned.p_in_registers and not tuned.pipeline
    assert tuned.persistent_ctas == mf.sm_count()
    assert ON_GPU or mf.sm_count() == 132
    interpreted = mf.default_launch(192, 128, jnp.float8_e4m3fn, jnp.bfloat16, interpret=True)
    assert interpreted.pingpong and interpreted.skip_padding_rows
    assert not (interpreted.lazy_rescale or interpreted.p_in_registers)
    assert interpreted.persistent_ctas is None


@settings(max_examples=60, deadline=None)
@given(
    cost=st.lists(st.integers(1, 50), min_size=1, max_size=200),
    ctas=st.integers(1, 40),
    skew=st.booleans(),
)
def test_item_schedule_gives_every_cta_a_balanced_run_of_items_in_id_order(cost, ctas, skew):
    """Every item exactly once, each CTA a non-empty run in increasing id, and the busiest CTA
    at most one item above the mean (the LPT list-scheduling bound)."""
    cost = np.asarray(cost, np.int64)
    if skew:  # a few costly items first, as edge tiles are cheap and interior ones not
        cost[: len(cost) // 5] *= 7
    ctas = min(ctas, len(cost))
    order, start = mf.item_schedule(cost, ctas)
    assert order.dtype == start.dtype == np.int32
    np.testing.assert_array_equal(np.sort(order), np.arange(len(cost)))
    assert start[0] == 0 and start[-1] == len(cost) and np.all(np.diff(start) >= 1)
    loads = []
    for c in range(ctas):
        run = order[start[c] : start[c + 1]]
        assert np.all(np.diff(run) > 0)
        loads.append(cost[run].sum())
    assert max(loads) <= cost.sum() / ctas + cost.max()


def test_item_schedule_balances_edge_tiles_better_than_round_robin():
    """Wan's 720p tiles at 90%: interior tiles of 3 consumers x ~126 key blocks, edge tiles of
    2 x ~105, tiles fastest over 40 heads. Round robin leaves the busiest of 132 CTAs ~8% above
    the mean; the schedule stays within 1%."""
    rng = np.random.default_rng(0)
    edge = np.arange(420) // 10 % 6 == 5  # tiles (7, 6, 10), W fastest: the last row of H
    tile_cost = np.where(edge, 2 * 105, 3 * 126) + rng.integers(0, 9, 420)
    cost = np.tile(tile_cost, 40)
    order, start = mf.item_schedule(cost, 132)
    busiest = max(cost[order[start[c] : start[c + 1]]].sum() for c in range(132))
    round_robin = max(cost[c::132].sum() for c in range(132))
    mean = cost.sum() / 132
    assert busiest < 1.01 * mean < round_robin / 1.05


def test_item_schedule_rejects_more_ctas_than_items():
    with pytest.raises(ValueError, match="need 1 <= ctas <= items"):
        mf.item_schedule(np.ones(3, np.int64), 4)


@pytest.mark.skipif(ON_GPU, reason="checks the error off a Hopper GPU")
def test_impl_says_it_needs_a_hopper_gpu():
    q = jnp.zeros((1, 192, 1, 64), jnp.bfloat16)
    cfg = FPSAConfig(tile=(3, 8, 8), quant="fp8")
    with pytest.raises(ValueError, match="impl='mosaic' needs an NVIDIA Hopper GPU"):
        fpsa_attention(q, q, q, grid=(3, 8, 8), config=cfg, impl="mosaic")


@pytest.mark.parametrize(
    "config, dtype, d, error, match",
    [
        (None, jnp.bfloat16, 64, ValueError, "needs an FPSAConfig"),
        (FPSAConfig(tile=(3, 8, 8)), jnp.float32, 64, NotImplementedError, "bf16 operands only"),
        (FPSAConfig(tile=(3, 8, 8), quant="fp8"), jnp.bfloat16, 48, ValueError, "head dim D in"),
        (FPSAConfig(tile=(4, 8, 8), quant="fp8"), jnp.bfloat16, 64, ValueError, "up to 192"),
    ],
)
def test_impl_rejects_inputs_before_touching_a_gpu(config, dtype, d, error, match):
    q = jnp.zeros((1, 256, 1, d), dtype)
    with pytest.raises(error, match=match):
        mosaic_attention(q, q, q, grid=(4, 8, 8), config=config, scale=0.1, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "launch",
    [
        mf.MosaicLaunch(stages=2),
        mf.MosaicLaunch(stages=6),
        mf.MosaicLaunch(prefetch=False),
        mf.MosaicLaunch(pipeline=True),
        mf.MosaicLaunch(p_in_registers=True),
        mf.MosaicLaunch(consumer_registers=None, producer_registers=None),
        mf.MosaicLaunch(lazy_rescale=True),
        mf.MosaicLaunch(pingpong=True),
        mf.MosaicLaunch(pingpong=True, lazy_rescale=True, p_in_registers=True),
        mf.MosaicLaunch(skip_padding_rows=True),
        mf.MosaicLaunch(
            pingpong=True, lazy_rescale=True, p_in_registers=True, skip_padding_rows=True
        ),
        mf.MosaicLaunch(persistent_ctas=7),
        dataclasses.replace(_default(), persistent_ctas=5),
        dataclasses.replace(_default(), persistent_ctas=None),
    ],
)
def test_launch_options_compute_the_same_attention(launch):
    """Every option reorders the same arithmetic: equal to the default launch up to float32
    reassociation and E4M3 ties (1e-3)."""
    case = CASES[1]
    grid, config = case[0], config_of(case, "fp8")
    keys = jax.random.split(jax.random.key(9), 3)
    q, k, v = (jax.random.normal(kk, (1, math.prod(grid), 2, 128), jnp.bfloat16) for kk in keys)
    run = lambda launch: jax.jit(
        lambda q, k, v: mosaic_attention(
            q, k, v, grid=grid, config=config, scale=0.088, launch=launch
        )
    )(q, k, v)
    assert rel_err(run(launch), run(None)) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["fp8", "none"])
def test_token_order_store_writes_the_kernel_layout_reordered(quant):
    """The kernel's token-order store (rows straight from registers to their token) against its
    kernel-layout output reordered by XLA: bit for bit, at a grid with edge tiles (padding
    rows skipped), B = 2, N = 3, into buffers the allocator just filled with NaN."""
    grid, config = (4, 9, 10), FPSAConfig(tile=(3, 8, 8), window=(1, 1, 2), quant=quant)
    keys = jax.random.split(jax.random.key(4), 3)
    q, k, v = (jax.random.normal(kk, (2, math.prod(grid), 3, 128), jnp.bfloat16) for kk in keys)
    ops = quantize_for_kernel(q, k, v, grid, config, block_n=mf.BLOCK_KV)
    blocks = key_block_list(grid, config.tile, config.window, ops.padded_tile, mf.BLOCK_KV)
    args = (ops.q, ops.k, ops.v_t, ops.q_scale, ops.k_scale, ops.v_scale, ops.key_bias)
    run = lambda **kw: jax.jit(
        lambda *a: mf.fpsa_forward(
            *a, blocks.blocks, blocks.count, padded_tile=ops.padded_tile, scale=0.088,
            p_scale=448.0 if quant == "fp8" else 1.0, out_dtype=jnp.bfloat16, **kw,
        )
    )(*args)  # fmt: skip
    want_o, want_lse = run()
    for _ in range(3):
        jnp.full(q.shape, jnp.nan, jnp.bfloat16).block_until_ready()
    o, lse = run(slot_token=slot_tokens(grid, config.tile, ops.padded_tile))
    assert o.shape == q.shape
    np.testing.assert_array_equal(
        np.asarray(o, np.float32), np.asarray(output_from_kernel(want_o, ops), np.float32)
    )
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(want_lse))


@pytest.mark.gpu
def test_wan_480p_shape_forward_and_gradients_match_xla():
    grid, config = (21, 30, 52), FPSAConfig(tile=(3, 8, 8), window=(3, 2, 3), quant="fp8")
    keys = jax.random.split(jax.random.key(6), 4)
    q, k, v, do = (jax.random.normal(kk, (1, 32760, 2, 128), jnp.bfloat16) for kk in keys)

    def grads(impl):
        def loss(q, k, v):
            o = fpsa_attention(q, k, v, grid=grid, config=config, impl=impl)
            return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)), o

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, out), got = grads("mosaic")
    (_, want_out), want = grads("xla")
    assert rel_err(out, want_out) < 0.03
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        assert rel_err(g, w) < 5e-2, name


@pytest.mark.gpu
def test_auto_picks_mosaic_where_it_runs_then_triton_then_xla():
    """Auto resolves FPSA configs to mosaic where both it and triton (its backward) run the
    inputs, to triton where only triton does, else to xla."""
    fp8 = FPSAConfig(tile=(3, 8, 8), window=(1, 1, 2), quant="fp8")
    bf16 = dataclasses.replace(fp8, quant="none")
    wide = dataclasses.replace(fp8, tile=(4, 8, 8))  # 256 tokens: more than three consumers
    assert resolve_impl("auto", fp8, jnp.bfloat16, 128) == "mosaic"
    assert resolve_impl("auto", fp8, jnp.float32, 64) == "mosaic"  # FP8 takes any float input
    assert resolve_impl("auto", bf16, jnp.bfloat16, 128) == "mosaic"
    assert resolve_impl("auto", bf16, jnp.float16, 128) == "triton"  # mosaic's bf16 mode only
    assert resolve_impl("auto", wide, jnp.bfloat16, 128) == "triton"
    assert resolve_impl("auto", fp8, jnp.bfloat16, 32) == "triton"  # mosaic needs D in 64/128/256
    assert resolve_impl("auto", fp8, jnp.bfloat16, 48) == "xla"  # D not a power of two
    assert resolve_impl("auto", fp8, jnp.bfloat16, 16) == "xla"  # FP8 dots need D >= 32
