"""The Flax encoder matches transformers' UMT5EncoderModel on random weights, through both
checkpoint layouts, on a batch whose rows have different padding lengths."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from fpsa_jax.convert.umt5 import load_umt5
from fpsa_jax.model.umt5 import UMT5Encoder
from tests.umt5.conftest import TRUE_LENGTHS


def _relative_error_on_valid_rows(out, ref) -> float:
    errs, scale = [], 0.0
    for b, n in enumerate(TRUE_LENGTHS):
        errs.append(np.max(np.abs(np.asarray(out[b, :n], np.float32) - ref[b, :n])))
        scale = max(scale, np.max(np.abs(ref[b, :n])))
    return max(errs) / scale


@pytest.mark.parametrize("layout", ["hf", "pipeline", "wan"])
def test_float32_output_matches_transformers(layout, checkpoints, inputs, reference):
    config, params = load_umt5(checkpoints[layout], jnp.float32)
    config = config.replace(dtype="float32")
    out = UMT5Encoder(config).apply({"params": params}, *map(jnp.asarray, inputs))
    assert out.dtype == jnp.float32
    assert _relative_error_on_valid_rows(out, reference) <= 1e-5


def test_bfloat16_compute_stays_close_to_float32(checkpoints, inputs, reference):
    config, params = load_umt5(checkpoints["wan"], jnp.bfloat16)
    assert config.dtype == "bfloat16" and config.param_dtype == "bfloat16"
    out = UMT5Encoder(config).apply({"params": params}, *map(jnp.asarray, inputs))
    assert out.dtype == jnp.bfloat16
    # bf16 keeps 8 mantissa bits; two layers of rounding stay within a few percent.
    assert _relative_error_on_valid_rows(out, reference) <= 5e-2
