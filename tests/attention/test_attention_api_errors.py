"""fpsa_attention dispatch and every error branch of the public surface."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fpsa_testlib import F32_RTOL, numpy_attention, random_qkv, rel_err

from fpsa_jax.attention import IMPLS, FPSAConfig, check_impl, fpsa_attention
from fpsa_jax.attention.api import resolve_impl
from fpsa_jax.attention.tiling import from_tiles, to_tiles

Q, K, V = random_qkv(0, (1, 12, 2, 16))
GRID = (1, 3, 4)
WINDOWED = FPSAConfig(tile=(1, 2, 2), window=(1, 1, 1))


def test_auto_on_cpu_is_plain_dense_attention():
    assert jax.default_backend() != "gpu" or pytest.skip("CPU behaviour")
    assert resolve_impl("auto", None, jnp.bfloat16, 128) == "xla"
    assert resolve_impl("auto", WINDOWED, jnp.bfloat16, 128) == "xla"
    out = fpsa_attention(Q, K, V, grid=GRID)
    assert rel_err(out, numpy_attention(Q, K, V, 0.25)) <= F32_RTOL


def test_explicit_scale_is_used():
    out = fpsa_attention(Q, K, V, grid=GRID, scale=0.7)
    assert rel_err(out, numpy_attention(Q, K, V, 0.7)) <= F32_RTOL


def test_unknown_impl_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown impl 'flash'; valid: auto, reference, xla"):
        fpsa_attention(Q, K, V, grid=GRID, impl="flash")


@pytest.mark.parametrize("bad", ["flash", "XLA", "", None, ["xla"]])
def test_check_impl_accepts_exactly_the_registered_names(bad):
    assert [check_impl(name) for name in IMPLS] == list(IMPLS)
    with pytest.raises(ValueError, match=r"unknown impl .*; valid: auto, reference, xla"):
        check_impl(bad)


def test_triton_off_hopper_says_what_it_needs():
    if jax.default_backend() == "gpu":
        pytest.skip("this machine may be a Hopper GPU")
    assert "triton" in IMPLS
    with pytest.raises(ValueError, match="impl='triton' needs an NVIDIA Hopper GPU.*impl='pallas'"):
        q, k, v = (jnp.concatenate([x, x], -1).astype(jnp.bfloat16) for x in (Q, K, V))  # D 32
        fp8 = FPSAConfig(tile=WINDOWED.tile, window=WINDOWED.window, quant="fp8")
        fpsa_attention(q, k, v, grid=GRID, config=fp8, impl="triton")


@pytest.mark.parametrize(
    "impl, config, match",
    [
        ("cudnn", WINDOWED, "cannot apply window"),
        ("cudnn", FPSAConfig(tile=(1, 2, 2), quant="fp8"), "cannot apply quant='fp8'"),
        ("cudnn_fp8", WINDOWED, "takes config=None"),
        ("cudnn_fp8", FPSAConfig(tile=(1, 2, 2), quant="fp8"), "takes config=None"),
    ],
)
def test_cudnn_rejects_what_it_cannot_serve(impl, config, match):
    with pytest.raises(ValueError, match=match):
        fpsa_attention(Q, K, V, grid=GRID, config=config, impl=impl)


@pytest.mark.parametrize("impl", ["cudnn", "cudnn_fp8"])
def test_cudnn_needs_a_gpu(impl):
    if jax.default_backend() == "gpu":
        pytest.skip("CPU behaviour")
    with pytest.raises(ValueError, match=f"impl='{impl}' needs an NVIDIA GPU.*'cpu'"):
        fpsa_attention(
            Q.astype(jnp.bfloat16),
            K.astype(jnp.bfloat16),
            V.astype(jnp.bfloat16),
            grid=GRID,
            impl=impl,
        )


@pytest.mark.parametrize(
    "q, k, v, grid, match",
    [
        (Q[0], K[0], V[0], GRID, r"q must be \[B, L, N, D\]"),
        (Q, K[:, :6], V, GRID, "same \\[B, L, N, D\\] shape"),
        (Q, K, V.astype(jnp.bfloat16), GRID, "share a dtype"),
        (Q.astype(jnp.int32), K, V, GRID, "q must be a floating dtype"),
        (Q, K, V, (2, 3, 4), r"T\*H\*W = 24 tokens but L = 12"),
        (Q, K, V, (3, 4), "grid must be 3 positive ints"),
        (Q, K, V, (1, 0, 12), "grid must be 3 positive ints"),
        (Q, K, V, (1.0, 3, 4), "grid must be 3 positive ints"),
        (Q, K, V, "abc", "grid must be 3 positive ints"),
    ],
)
def test_bad_inputs_raise(q, k, v, grid, match):
    with pytest.raises(ValueError, match=match):
        fpsa_attention(q, k, v, grid=grid)


def test_config_must_be_an_fpsa_config():
    with pytest.raises(ValueError, match="config must be an FPSAConfig or None, got dict"):
        fpsa_attention(Q, K, V, grid=GRID, config={"tile": (1, 1, 1)})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tile=(1, 2)), "FPSAConfig.tile must be 3 positive ints"),
        (dict(tile=(1, 0, 2)), "FPSAConfig.tile entries must be >= 1"),
        (dict(tile=(1, 2.0, 2)), "FPSAConfig.tile must be 3 positive ints"),
        (dict(tile=(True, 1, 1)), "FPSAConfig.tile must be 3 positive ints"),
        (dict(tile="abc"), "FPSAConfig.tile must be 3 positive ints"),
        (dict(tile=(1, 1, 1), window=(0, 1, 1)), "FPSAConfig.window entries must be >= 1"),
        (dict(tile=(1, 1, 1), quant="int8"), "FPSAConfig.quant must be one of"),
        (dict(tile=(1, 1, 1), q_group=(1, 1)), "FPSAConfig.q_group"),
        (dict(tile=(1, 1, 1), k_group=(1, -1, 1)), "FPSAConfig.k_group"),
        (dict(tile=(1, 1, 1), scale=500.0), "FPSAConfig.scale must be in"),
        (dict(tile=(1, 1, 1), scale=0.0), "FPSAConfig.scale must be in"),
        (dict(tile=(1, 1, 1), scale="448"), "FPSAConfig.scale must be a number"),
    ],
)
def test_invalid_config_fields_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FPSAConfig(**kwargs)


def test_config_is_hashable_and_round_trips():
    cfg = FPSAConfig(tile=[2, 8, 8], window=[3, 3, 5], quant="fp8", q_group=np.array([2, 2, 2]))
    assert cfg.tile == (2, 8, 8) and hash(cfg) == hash(FPSAConfig.from_dict(cfg.to_dict()))
    assert FPSAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields \\['tiles'\\]"):
        FPSAConfig.from_dict({"tiles": (1, 1, 1)})


def test_tile_layout_shape_errors():
    with pytest.raises(ValueError, match="to_tiles: L=12"):
        to_tiles(Q, (2, 3, 4), (1, 1, 1))
    with pytest.raises(ValueError, match="from_tiles: expected"):
        from_tiles(jnp.zeros((1, 5, 4, 2, 16)), GRID, (1, 2, 2))
