"""The host bucket table matches the T5 bucket formula written out independently, entry by
entry, and the PyTorch implementation in transformers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fpsa_jax.model.umt5 import relative_position_buckets


def _bucket(rel: int, num_buckets: int, max_distance: int) -> int:
    """One entry of the bidirectional T5 bucket formula, in Python floats (float64)."""
    half = num_buckets // 2
    offset = half if rel > 0 else 0
    dist = abs(rel)
    exact = half // 2
    if dist < exact:
        return offset + dist
    scaled = math.log(dist / exact) / math.log(max_distance / exact) * (half - exact)
    return offset + min(exact + int(scaled), half - 1)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 20), (8, 64)])
def test_buckets_match_the_formula_entry_by_entry(num_buckets, max_distance):
    q_len, k_len = 70, 300  # distances well past max_distance on the key side
    table = relative_position_buckets(q_len, k_len, num_buckets, max_distance)
    assert table.dtype == np.int32 and table.shape == (q_len, k_len)
    expected = np.array(
        [[_bucket(j - i, num_buckets, max_distance) for j in range(k_len)] for i in range(q_len)]
    )
    np.testing.assert_array_equal(table, expected)
    assert table.min() == 0 and table.max() == num_buckets - 1


def test_buckets_match_transformers_at_umt5_xxl_settings():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.UMT5Config(
        d_model=8,
        d_kv=2,
        num_heads=4,
        num_layers=1,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
    )
    attention = transformers.models.umt5.modeling_umt5.UMT5Attention(
        config, has_relative_attention_bias=True
    )
    length = 512
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    ours = relative_position_buckets(length, length, 32, 128)
    np.testing.assert_array_equal(ours, attention._relative_position_bucket(rel).numpy())
