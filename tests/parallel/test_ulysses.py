"""`ulysses_attention` on one device: exactly `fpsa_attention` without a 'seq' split, and its
error branches (checked before any device work, so an abstract mesh suffices)."""

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

from fpsa_jax.attention import FPSAConfig, fpsa_attention
from fpsa_jax.parallel import make_mesh, sequence_parallel_size, ulysses_attention, use_sharding

GRID = (2, 3, 4)
WINDOWED_FP8 = FPSAConfig(tile=(1, 2, 2), window=(1, 1, 1), quant="fp8")
SEQ2 = AbstractMesh((1, 1, 2), ("data", "fsdp", "seq"), axis_types=(AxisType.Auto,) * 3)


def _qkv(n=4, length=24, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((2, length, n, 8)).astype(np.float32) for _ in range(3)]


@pytest.mark.parametrize("config", [None, WINDOWED_FP8])
def test_without_a_seq_split_it_is_exactly_fpsa_attention(config):
    q, k, v = _qkv()
    kwargs = dict(grid=GRID, config=config, impl="xla")
    want = jax.jit(lambda q, k, v: fpsa_attention(q, k, v, **kwargs))(q, k, v)
    ulysses = jax.jit(lambda q, k, v: ulysses_attention(q, k, v, **kwargs))
    np.testing.assert_array_equal(ulysses(q, k, v), want)
    with use_sharding(make_mesh()):  # a mesh in context with seq = 1
        ulysses = jax.jit(lambda q, k, v: ulysses_attention(q, k, v, **kwargs))
        np.testing.assert_array_equal(ulysses(q, k, v), want)


def test_sequence_parallel_size_reads_the_seq_axis():
    assert sequence_parallel_size(None) == 1
    assert sequence_parallel_size(jax.sharding.get_abstract_mesh()) == 1  # empty
    assert sequence_parallel_size(SEQ2) == 2
    assert sequence_parallel_size(SEQ2, axis="ring") == 1


def test_heads_not_divisible_by_the_seq_size_is_an_error():
    q, k, v = _qkv(n=3)
    with pytest.raises(ValueError, match="3 heads are not divisible by 2"):
        ulysses_attention(q, k, v, grid=GRID, impl="xla", mesh=SEQ2)


def test_tokens_not_divisible_by_the_seq_size_is_an_error():
    q, k, v = _qkv(length=15)
    with pytest.raises(ValueError, match=r"L=15 tokens \(grid \(1, 3, 5\)\).*not divisible by 2"):
        ulysses_attention(q, k, v, grid=(1, 3, 5), impl="xla", mesh=SEQ2)
