"""encode_text cuts each row to its true length (Wan's list) or zero-pads them (the DiT's
[B, text_len, E] context); the encoder ignores what sits at padded positions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpsa_jax.convert.umt5 import load_umt5
from fpsa_jax.model.umt5 import UMT5Config, UMT5Encoder, encode_text, init_params
from tests.umt5.conftest import LENGTH, TRUE_LENGTHS


@pytest.fixture(scope="module")
def model(checkpoints):
    config, params = load_umt5(checkpoints["wan"], jnp.float32)
    return config.replace(dtype="float32"), params


def test_list_output_has_true_lengths_and_reference_values(model, inputs, reference):
    config, params = model
    rows = encode_text(params, config, *inputs)
    assert [r.shape for r in rows] == [(n, config.d_model) for n in TRUE_LENGTHS]
    for row, ref, n in zip(rows, reference, TRUE_LENGTHS, strict=True):
        np.testing.assert_allclose(np.asarray(row), ref[:n], rtol=0, atol=2e-5)


@pytest.mark.parametrize("pad_to", [512, LENGTH, 40])
def test_padded_output_is_the_cut_rows_then_zeros(model, inputs, pad_to):
    config, params = model
    rows = encode_text(params, config, *inputs)
    padded = np.asarray(encode_text(params, config, *inputs, pad_to=pad_to))
    assert padded.shape == (len(TRUE_LENGTHS), pad_to, config.d_model)
    for b, (row, n) in enumerate(zip(rows, TRUE_LENGTHS, strict=True)):
        kept = min(n, pad_to)
        np.testing.assert_array_equal(padded[b, :kept], np.asarray(row)[:kept])
        assert not padded[b, kept:].any()


def test_padding_content_and_padding_length_do_not_change_valid_rows(model, inputs):
    config, params = model
    ids, mask = inputs
    encoder = UMT5Encoder(config)
    base = np.asarray(encoder.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    n = TRUE_LENGTHS[1]
    noisy = np.where(mask[1:2] == 1, ids[1:2], 7)  # garbage ids where the mask is 0
    out = encoder.apply({"params": params}, jnp.asarray(noisy), jnp.asarray(mask[1:2]))
    np.testing.assert_allclose(np.asarray(out)[0, :n], base[1, :n], rtol=0, atol=1e-5)
    cut = encoder.apply({"params": params}, jnp.asarray(ids[1:2, :n]), jnp.asarray(mask[1:2, :n]))
    np.testing.assert_allclose(np.asarray(cut)[0], base[1, :n], rtol=0, atol=1e-5)


def test_init_params_builds_the_tree_the_converter_fills(model):
    config, params = model
    fresh = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    shapes = jax.tree.map(jnp.shape, fresh)
    assert shapes == jax.tree.map(jnp.shape, params)
    assert shapes["blocks"]["pos_embedding"] == (config.num_layers, 32, config.num_heads)


def test_ids_and_mask_of_different_shapes_are_rejected():
    config = UMT5Config.preset("tiny")
    with pytest.raises(ValueError, match=r"ids and mask must both be \[B, L\]"):
        UMT5Encoder(config).init(
            jax.random.key(0), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 3), jnp.int32)
        )
