"""FP8 block linears in the pipeline: `with_fp8_linears` quantizes the DiT once, and `denoise`
runs the result.

Tolerance: E4M3 moves each block linear's output by ~2-4% (tests/model/test_fp8_linear.py); over
4 guided Euler steps of the tiny model the latents stay within a few percent of the float run,
and they cannot equal it.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fpsa_jax.convert import with_fp8_linears
from fpsa_jax.model.fp8_linear import FP8
from fpsa_jax.pipeline import denoise


def test_with_fp8_linears_quantizes_the_block_linears_once(tiny_model):
    weights = tiny_model.weights
    fp8 = with_fp8_linears(weights)
    assert fp8.dit_config == weights.dit_config.replace(linear_quant="fp8")
    assert weights.dit_config.linear_quant == "none"
    assert fp8.dit_params["blocks"]["self_attn"]["v"]["kernel"].dtype == FP8
    assert fp8.dit_params["blocks"]["self_attn"]["v"]["kernel_scale"].dtype == jnp.float32
    assert fp8.dit_params["patch_embedding"] is weights.dit_params["patch_embedding"]
    assert fp8.vae_params is weights.vae_params


def test_denoise_with_fp8_linears_stays_close_to_the_float_run(tiny_model, request_inputs):
    def run(weights, **kw):
        return np.asarray(
            denoise(
                weights,
                jnp.asarray(request_inputs.noise),
                jnp.asarray(request_inputs.context),
                jnp.asarray(request_inputs.negative_context),
                num_steps=4,
                shift=3.0,
                guide_scale=3.0,
                solver="euler",
                attention_impl="xla",
                **kw,
            ),
            np.float64,
        )

    ref = run(tiny_model.weights)
    fp8 = run(with_fp8_linears(tiny_model.weights), linear_impl="emulated")
    rel = np.linalg.norm(fp8 - ref) / np.linalg.norm(ref)
    assert 1e-4 < rel < 0.05, rel
